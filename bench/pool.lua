-- Pool throughput and latency (bench/run.lua protocol), each measured twice:
-- "cold" is the first run on a freshly started pool (workers up, nothing
-- else done), "steady" the median of the next 5 runs on that warm pool,
-- where a farm that runs for days lives.
--   map_default    pool:map of 100,000 trivial tasks, default chunksize
--   map_chunk1     pool:map of 20,000 trivial tasks, chunksize 1
--   imap_chunk1    the same through pool:imap (Python's default chunksize)
--   apply_rtt      1,000 apply_async(sq, {i}):get() round trips
--   start_close_join  Pool(2) start + close + join, beside the C floor
-- Python's side: pool.py.
local mp = require "multiprocessing"
local clock = require("multiprocessing.core").monotonic

local bench = require "bench.lib"
local emit = bench.emit

local function sq(x) return x * x end

local STEADY = 5

local function median(t)
  table.sort(t)
  return t[(#t + 1) // 2]
end

-- One fresh pool: run(pool) once cold, then STEADY times; each run
-- returns its operation count.
local function cold_steady(case, run)
  collectgarbage()
  local pool = mp.Pool(2)
  pool:map(sq, { 1, 2, 3, 4 })             -- workers up, function cached
  local t0 = clock()
  local n = run(pool)
  emit(case .. "_cold", "lua-mp", n / (clock() - t0), "ops/s")
  local rates = {}
  for i = 1, STEADY do
    t0 = clock()
    n = run(pool)
    rates[i] = n / (clock() - t0)
  end
  emit(case .. "_steady", "lua-mp", median(rates), "ops/s")
  pool:close(); pool:join()
end

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
  local floor = bench.c_rate("forkjoin", "200 2")
  if floor then emit("start_close_join", "c-fork2", floor, "ops/s") end

  local function inputs(n)
    local xs = {}
    for i = 1, n do xs[i] = i end
    return xs
  end
  local big, small = inputs(100000), inputs(20000)

  cold_steady("map_default", function(pool)
    local r = pool:map(sq, big)
    assert(r[#big] == #big * #big and r[1] == 1, "map_default: wrong result")
    return #big
  end)
  cold_steady("map_chunk1", function(pool)
    local r = pool:map(sq, small, 1)
    assert(r[#small] == #small * #small and r[777] == 777 * 777, "map_chunk1: wrong result")
    return #small
  end)
  cold_steady("imap_chunk1", function(pool)
    local sum, n = 0, 0
    for _, v in pool:imap(sq, small, 1) do sum = sum + v; n = n + 1 end
    assert(n == #small and sum == #small * (#small + 1) * (2 * #small + 1) // 6,
      "imap_chunk1: wrong result")
    return n
  end)
  big, small = nil, nil                    -- luacheck: ignore (a clean heap for the next case)
  cold_steady("apply_rtt", function(pool)
    local M = 1000
    for i = 1, M do
      if pool:apply_async(sq, { i }):get() ~= i * i then error("apply_rtt: wrong result") end
    end
    return M
  end)
  -- the floor of a round trip: one byte each way over a socketpair (the
  -- pool's channels are Unix sockets), in C
  floor = bench.c_rate("pingpong", "100000 socket")
  if floor then emit("apply_rtt_steady", "c-socketpair", floor, "ops/s") end
end
