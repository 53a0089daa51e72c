-- A Pool of 4 workers runs 5 tasks that each sleep a random time. Every
-- task prints the pid of the worker running it: the 5th has to wait until
-- one of the first four is done, then runs in the worker that was freed.
-- Then the pool is closed and joined. Prints something like:
--   task 1 starts in worker 4101 at 0.00 s, sleeps 0.62 s
--   task 2 starts in worker 4102 at 0.00 s, sleeps 0.25 s
--   task 3 starts in worker 4103 at 0.00 s, sleeps 0.47 s
--   task 4 starts in worker 4104 at 0.00 s, sleeps 0.71 s
--   task 5 starts in worker 4102 at 0.25 s, sleeps 0.33 s
--   task 5 waited 0.25 s for a free worker: 4102, freed by task 2
local mp = require "multiprocessing"
local clock = require("multiprocessing.core").monotonic

local function task(i, t0, secs)
  local start = clock() - t0
  local pid = mp.current_process().pid
  print(("task %d starts in worker %d at %.2f s, sleeps %.2f s"):format(i, pid, start, secs))
  io.stdout:flush()
  mp.wait({}, secs)                       -- waiting on nothing: a sleep
  return pid, start, clock() - t0
end

if mp.is_main() then
  math.randomseed(os.time())
  local pool = mp.Pool(4)
  local t0 = clock()
  local results = {}
  for i = 1, 5 do
    results[i] = pool:apply_async(task, { i, t0, 0.2 + math.random() * 0.6 })
  end
  pool:close()
  pool:join()
  local pid5, start5 = results[5]:get()
  for i = 1, 4 do
    local pid, _, finish = results[i]:get()
    if pid == pid5 then
      print(("task 5 waited %.2f s for a free worker: %d, freed by task %d at %.2f s")
            :format(start5, pid5, i, finish))
    end
  end
end
