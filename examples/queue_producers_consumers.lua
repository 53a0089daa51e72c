-- Ten producer processes each put one line on a Queue bounded to 3 items
-- (so producers wait for room), ten consumer processes each take one and
-- print it holding a Lock, so that lines never interleave.
-- Prints ten lines like (pids and the monotonic clock's seconds vary, and
-- so does the order):
--   12360 (get): 12350 (put): 2917.171
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local function producer(q)
  q:put(mp.current_process().pid .. " (put): " .. string.format("%.3f", core.monotonic()))
end

local function consumer(q, lock)
  local info = q:get(10)
  lock:with(function()
    print(mp.current_process().pid .. " (get): " .. tostring(info))
    io.flush()
  end)
end

if mp.is_main() then
  local lock = mp.Lock()
  local q = mp.Queue(3)
  local producers, consumers = {}, {}
  for i = 1, 10 do
    producers[i] = mp.Process{ target = producer, args = { q } }
    producers[i]:start()
  end
  for i = 1, 10 do
    consumers[i] = mp.Process{ target = consumer, args = { q, lock } }
    consumers[i]:start()
  end
  for _, p in ipairs(producers) do p:join() end
  q:close()                                -- no more puts from this process
  for _, p in ipairs(consumers) do p:join() end
end
