-- A work list on a JoinableQueue served by 4 worker processes: each worker
-- takes a task, works on it, puts the result on a second queue and calls
-- task_done(); the parent's join() returns once every task is done.
-- Prints:
--   20 tasks done by 4 workers
--   sum of squares 1..20 = 2870
local mp = require "multiprocessing"

local function worker(tasks, results)
  while true do
    local n = tasks:get()
    if n == "stop" then tasks:task_done(); return end
    results:put(n * n)
    tasks:task_done()
  end
end

if mp.is_main() then
  local tasks, results = mp.JoinableQueue(), mp.Queue()
  local workers = {}
  for i = 1, 4 do
    workers[i] = mp.Process{ target = worker, args = { tasks, results } }
    workers[i]:start()
  end
  for n = 1, 20 do tasks:put(n) end
  assert(tasks:join(10), "the workers did not finish in time")
  local sum = 0
  for _ = 1, 20 do sum = sum + results:get(1) end
  print(string.format("20 tasks done by %d workers", #workers))
  print("sum of squares 1..20 = " .. sum)
  for _ = 1, #workers do tasks:put("stop") end
  tasks:join(10)
  for _, w in ipairs(workers) do w:join() end
end
