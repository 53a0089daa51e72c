-- Chaos family "pool" (chaos/run.lua): a Pool of 3 with an initializer
-- runs ROUNDS map_async calls of 50 to 150 items, chunksize 1; before each,
-- 0 to 3 random descendants of the trial process are SIGKILLed (workers;
-- under forkserver also the fork server and the child it forked ahead),
-- then the map is submitted at once or a few ms later. Each map must either
-- return every result right or raise (a task whose worker died fails with
-- WorkerLostError). Counted:
--   lost        items of a map that returned whose result is missing or wrong
--   duplicated  task executions beyond one per item (the initializer gives
--               each worker a shared array; a task adds one to its item's
--               slot: a task is run at most once, or fails)
--   hangs       a get that did not return within BOUND seconds, or jobs
--               still unfinished BOUND seconds after the closing close()
--               (the pool's stats go to the log; the trial then terminates
--               the pool)
-- CHAOS_POOL_ROUNDS overrides the number of maps per trial.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local lib = require "chaos.lib"

local ROUNDS = tonumber(os.getenv("CHAOS_POOL_ROUNDS")) or 12
local MAXITEMS, BOUND = 150, 15

-- counts[x]: executions of item x; pids[x]: the pid of the last one
local function init(counts, pids) lib.counts, lib.pids = counts, pids end

local function task(x)
  local c = lib.counts
  c[x] = c[x] + 1
  lib.pids[x] = core.getpid()
  if x % 7 == 0 then lib.sleep(0.001) end
  return 2 * x
end

local function trial(method, k)
  local r = { lost = 0, dup = 0, hangs = 0 }
  local me = core.getpid()
  local counts = mp.RawArray("int32", ROUNDS * MAXITEMS)
  local pids = mp.RawArray("int32", ROUNDS * MAXITEMS)
  local pool = mp.Pool{ processes = 3, initializer = init, initargs = { counts, pids } }
  local hung = false
  for round = 1, ROUNDS do
    local d = {}
    for _, s in ipairs(lib.descendants(me)) do
      if s.state ~= "Z" then d[#d + 1] = s end
    end
    local killed = {}
    for _ = 1, math.random(0, 3) do
      if #d == 0 then break end
      local s = table.remove(d, math.random(#d))
      pcall(core.kill, s.pid, 9)
      killed[#killed + 1] = s.pid
    end
    if math.random() < 0.5 then lib.sleep(math.random() * 0.005) end
    local n = math.random(50, MAXITEMS)
    local base = (round - 1) * MAXITEMS
    local xs = {}
    for i = 1, n do xs[i] = base + i end
    local ok, res, why = pcall(function()
      return pool:map_async(task, xs, 1):get(BOUND)
    end)
    if ok and res == nil then
      local st = pool:stats()
      io.stderr:write(("chaos: pool %s trial %d round %d: get gave nil, %s after %d s; "
        .. "workers=%d busy=%d queued=%d done=%d failed=%d restarts=%d\n"):format(
        method, k, round, tostring(why), BOUND, st.workers, st.busy, st.queued, st.done,
        st.failed, st.restarts))
      r.hangs = r.hangs + 1
      hung = true
    elseif ok then
      for i = 1, n do
        if res[i] ~= 2 * xs[i] then r.lost = r.lost + 1 end
      end
    elseif not (type(res) == "table" and res.type == "WorkerLostError") then
      io.stderr:write(("chaos: pool %s trial %d round %d (killed %s): %s\n"):format(method, k,
        round, table.concat(killed, ","), tostring(res)))
    end
    for i = 1, n do
      local c = counts[base + i]
      if c > 1 then
        r.dup = r.dup + c - 1
        io.stderr:write(("chaos: pool %s trial %d round %d: item %d ran %d times, last in pid %d\n")
          :format(method, k, round, i, c, pids[base + i]))
      end
    end
    if hung then break end
  end
  if not hung then
    -- close, and the queued tasks must be done (or failed) within BOUND
    pool:close()
    local deadline = lib.now() + BOUND
    local active = 1
    while active > 0 and lib.now() < deadline do
      local ok, a = pcall(pool.poll, pool, 0.1)   -- (a failed restart raises)
      if ok then active = a end
    end
    if active > 0 then
      local st = pool:stats()
      io.stderr:write(("chaos: pool %s trial %d: %d jobs still unfinished %d s after close; "
        .. "workers=%d busy=%d queued=%d\n"):format(method, k, active, BOUND, st.workers, st.busy,
        st.queued))
      r.hangs = r.hangs + 1
      hung = true
    end
  end
  if hung then pool:terminate() end
  pool:join()
  counts:close(); pids:close()
  return r
end

if mp.is_main() then lib.batch(trial, ROUNDS * BOUND + 60) end
