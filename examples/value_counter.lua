-- Four processes increment one shared Value under its lock; no increment
-- is lost. Prints "counter = 40000".
local mp = require "multiprocessing"

local function work(counter, n)
  local lock = counter:get_lock()
  for _ = 1, n do
    lock:acquire()
    counter.value = counter.value + 1   -- read and write under the lock
    lock:release()
  end
end

if mp.is_main() then
  local counter = mp.Value("int64", 0)  -- with its own RLock, as in Python
  local procs = {}
  for i = 1, 4 do
    procs[i] = mp.Process{ target = work, args = { counter, 10000 } }
    procs[i]:start()
  end
  for _, p in ipairs(procs) do p:join() end
  print("counter = " .. counter.value)
end
