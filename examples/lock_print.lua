-- Five processes print under one Lock, so their lines never interleave
-- (the seed example of Python's multiprocessing docs).
-- Prints "hello world 1" .. "hello world 5", one whole line each, in the
-- order the processes got the lock.
local mp = require "multiprocessing"

local function f(lock, i)
  lock:with(function()
    io.write("hello world ", i, "\n")
    io.flush()
  end)
end

if mp.is_main() then
  local lock = mp.Lock()
  local procs = {}
  for i = 1, 5 do
    procs[i] = mp.Process{ target = f, args = { lock, i } }
    procs[i]:start()
  end
  for _, p in ipairs(procs) do p:join() end
end
