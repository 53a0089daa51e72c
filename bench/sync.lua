-- Locks and shared values, for bench/run.lua; bench/sync.py is Python's
-- side. Each case reports the median of 3 trials. Both sides write what a
-- user writes: method calls, no methods cached in locals.
--   lock_uncontended   lock:acquire(); lock:release() pairs/s
--   rlock_uncontended  the same with an RLock
--   sem_uncontended    Semaphore acquire+release pairs/s
--   value_2procs       two processes each doing 100,000 times
--                      local l = v:get_lock(); l:acquire();
--                      v.value = v.value + 1; l:release()
--                      (Python: with v.get_lock(): v.value += 1): increments/s
-- Beside them, the C floors (bench/mutex.c): a process-shared robust
-- pthread mutex's lock+unlock pair, and two processes incrementing a
-- shared counter under it.
local mp = require "multiprocessing"
local clock = require("multiprocessing.core").monotonic

local bench = require "bench.lib"
local function emit(case, r, unit) bench.emit(case, "lua-mp", r, unit) end

local function median3(f)
  local t = { f(), f(), f() }
  table.sort(t)
  return t[2]
end

local function pairs_rate(obj, n)
  return median3(function()
    local t0 = clock()
    for _ = 1, n do obj:acquire(); obj:release() end
    return n / (clock() - t0)
  end)
end

if mp.is_main() then
  local lock <close> = mp.Lock()
  emit("lock_uncontended", pairs_rate(lock, 2000000), "ops/s")
  local floor = bench.c_rate("mutex", "2000000 1")
  if floor then bench.emit("lock_uncontended", "c-mutex", floor, "ops/s") end
  local rlock <close> = mp.RLock()
  emit("rlock_uncontended", pairs_rate(rlock, 2000000), "ops/s")
  local sem <close> = mp.Semaphore(1)
  emit("sem_uncontended", pairs_rate(sem, 2000000), "ops/s")

  local N = 100000
  local function work(v)
    for _ = 1, N do
      local l = v:get_lock()
      l:acquire()
      v.value = v.value + 1
      l:release()
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
  floor = bench.c_rate("mutex", N .. " 2")
  if floor then bench.emit("value_2procs", "c-mutex", floor, "ops/s") end
end
