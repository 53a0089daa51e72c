-- Pool throughput and latency (bench/run.lua protocol): map of 100,000
-- trivial tasks at the default chunksize and at chunksize 1, apply_async
-- round trips, and Pool(2) start + close + join. Python's side: pool.py.
local mp = require "multiprocessing"
local clock = require("multiprocessing.core").monotonic

local emit = require("bench.lib").emit

local function sq(x) return x * x end

if mp.is_main() then
  -- first, while the process is small (fork copies page tables)
  local K = 200
  local t0 = clock()
  for _ = 1, K do
    local p = mp.Pool(2)
    p:close(); p:join()
  end
  emit("start_close_join", "lua-mp", K / (clock() - t0), "ops/s")
  -- the floor: two children forked, told to exit and reaped, in C
  local floor = require("bench.lib").c_rate("forkjoin", "200 2")
  if floor then emit("start_close_join", "c-fork2", floor, "ops/s") end

  local N = 100000
  local xs = {}
  for i = 1, N do xs[i] = i end
  local pool = mp.Pool(2)
  pool:map(sq, { 1, 2, 3, 4 })             -- workers up, function cached

  t0 = clock()
  local r = pool:map(sq, xs)
  emit("map_100k_default", "lua-mp", N / (clock() - t0), "ops/s")
  assert(r[N] == N * N and r[1] == 1, "map_100k_default: wrong result")

  t0 = clock()
  r = pool:map(sq, xs, 1)
  emit("map_100k_chunk1", "lua-mp", N / (clock() - t0), "ops/s")
  assert(r[N] == N * N and r[777] == 777 * 777, "map_100k_chunk1: wrong result")

  r, xs = nil, nil                        -- luacheck: ignore (a clean heap for the next case)
  collectgarbage()
  local M = 5000
  t0 = clock()
  for i = 1, M do
    local v = pool:apply_async(sq, { i }):get()
    if v ~= i * i then error("apply_async_rtt: wrong result") end
  end
  emit("apply_async_rtt", "lua-mp", M / (clock() - t0), "ops/s")
  pool:close(); pool:join()
end
