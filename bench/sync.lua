-- Locks and shared values (issue 4), for bench/run.lua; bench/sync.py is
-- Python's side. Each case reports the median of 3 trials.
--   lock_uncontended   acquire+release pairs/s, methods cached in locals
--   rlock_uncontended  the same with an RLock
--   sem_uncontended    Semaphore acquire+release pairs/s
--   value_2procs       two processes each doing 100,000 increments of one
--                      Value under its lock (the default RLock): increments/s
local mp = require "multiprocessing"
local clock = require("multiprocessing.core").monotonic

local bench_emit = require("bench.lib").emit
local function emit(case, r, unit) bench_emit(case, "lua-mp", r, unit) end

local function median3(f)
  local t = { f(), f(), f() }
  table.sort(t)
  return t[2]
end

local function pairs_rate(obj, n)
  local acq, rel = obj.acquire, obj.release
  return median3(function()
    local t0 = clock()
    for _ = 1, n do acq(obj); rel(obj) end
    return n / (clock() - t0)
  end)
end

if mp.is_main() then
  local lock <close> = mp.Lock()
  emit("lock_uncontended", pairs_rate(lock, 2000000), "ops/s")
  local rlock <close> = mp.RLock()
  emit("rlock_uncontended", pairs_rate(rlock, 2000000), "ops/s")
  local sem <close> = mp.Semaphore(1)
  emit("sem_uncontended", pairs_rate(sem, 2000000), "ops/s")

  local N = 100000
  local function work(v)
    local vlock = v:get_lock()
    local acq, rel = vlock.acquire, vlock.release
    for _ = 1, N do
      acq(vlock)
      v.value = v.value + 1
      rel(vlock)
    end
  end
  local v <close> = mp.Value("int32", 0)
  emit("value_2procs", median3(function()
    v.value = 0
    local t0 = clock()
    local p = mp.Process{ target = work, args = { v } }
    p:start()
    work(v)
    p:join()
    local dt = clock() - t0
    p:close()
    assert(v.value == 2 * N, "lost increments: " .. v.value)
    return 2 * N / dt
  end), "ops/s")
end
