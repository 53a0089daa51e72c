-- bench/queues.lua: Queue throughput between two processes, and a round
-- trip through two queues against a raw C pipe ping-pong (bench/pingpong.c,
-- built into a temporary file by bench.lib). Prints <case>\t<impl>\t<value>\t<unit>.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local now = core.monotonic
local lib = require "bench.lib"

local function producer(q, item, n)
  for _ = 1, n do q:put(item) end
end

-- items/s (or MiB/s) from one producer process to this process
local function stream(item, n)
  collectgarbage()                          -- each case starts with a clean heap
  local q = mp.Queue()
  local t0 = now()
  local p = mp.Process{target = producer, args = {q, item, n}}
  p:start()
  for _ = 1, n do assert(q:get(30) ~= nil) end
  local dt = now() - t0
  p:join(30)
  q:close()
  return dt
end

local function pingpong(n)
  collectgarbage()
  return (n - 1) / lib.roundtrips(mp.Queue(), mp.Queue(), n - 1)
end

if mp.is_main() then
  local N = 1000000
  stream(0, 20000)                          -- warm up (not measured)
  lib.emit("queue_small_int", "lua-mp", N / stream(12345, N), "ops/s")
  lib.emit("queue_small_str", "lua-mp", N / stream("hello, world", N), "ops/s")
  local M = 1000
  lib.emit("queue_1mib", "lua-mp", M / stream(string.rep("x", 1 << 20), M), "MiB/s")
  lib.emit("queue_pingpong", "lua-mp", pingpong(200000), "ops/s")
  local rate = lib.c_rate("pingpong", "200000")   -- the C baseline
  if rate then lib.emit("queue_pingpong", "c-pipe", rate, "ops/s") end
end
