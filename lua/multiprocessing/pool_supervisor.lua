-- multiprocessing.pool_supervisor: a Pool's workers: their start, their
-- death and their replacement (docs/design.md, decision 6).
--
-- Methods of the Pool (pool.lua installs them). Each slot 1..n has a
-- channel in the PoolCore (csrc/pool.c) and, while a worker serves it, a
-- record in pool._workers[slot]:
--
--   { proc = Process, pid =, fifo =, head =, tail = (its chunks, see
--     pool_scheduler.lua), inflight = chunks held, items = items sent (for
--     maxtasksperchild), sent = fnid -> true (functions it knows),
--     exclusive = the chunk with a deadline it runs alone, retiring = true
--     (it asked to leave), exit_sent = true (EXIT sent) }
--
-- Start methods: a forked worker inherits the Pool and serves its slot of
-- the PoolCore; a spawned or forkserver worker (restarts use the pool's
-- method too) gets a PoolWorker handle to its slot and the initializer
-- through the codec (pool_worker.lua). The parent's side is the same under
-- every method.

local core = require "multiprocessing.core"
local errors = require "multiprocessing.errors"
local log = require "multiprocessing.log"
local process = require "multiprocessing.process"
local worker = require "multiprocessing.pool_worker"

local type, error, pairs, next, tostring, setmetatable, pcall =
      type, error, pairs, next, tostring, setmetatable, pcall
local math_min, math_max = math.min, math.max
local monotonic = core.monotonic

local Pool = {}             -- the methods this module gives the Pool

local WEAK_VALUES = { __mode = "v" }

-- A slot's worker Process, not started yet (its channel opened)
function Pool:_worker_process(slot)
  local pc = self._pc
  pc:open(slot)
  if self._method == "fork" then
    -- the worker's Process (kept by process.lua until joined) must not keep
    -- the pool alive, or a forgotten pool would never be collected
    local ref = setmetatable({ self }, WEAK_VALUES)
    local p = process._new({ target = worker.forked_main, args = { ref, slot }, daemon = true,
                             name = "PoolWorker-" .. slot, _method = "fork" })
    -- with no initializer to run at its start, the worker waits in C for
    -- its first frame: one that only ever gets EXIT leaves without Lua
    if not self._initializer then pc:lazy(slot, p) end
    return p
  end
  return process._new({
    target = worker.spawned_main,
    args = { { pc:_worker_handle(slot), self._initializer, self._initargs,
               self._maxtasks, self._maxmem } },
    daemon = true, name = "PoolWorker-" .. slot, _method = self._method })
end

-- Record slot's started worker p
function Pool:_started(slot, p)
  self._pc:forked(slot, p.sentinel)
  self._workers[slot] = { proc = p, pid = p.pid, fifo = {}, head = 1, tail = 1,
                          inflight = 0, sent = {}, items = 0 }
  self._nworkers = self._nworkers + 1
end

-- Start every slot's worker, all forked back to back (process._start_all);
-- those started before a failure are recorded, so terminate reaps them.
function Pool:_start_workers()
  local procs = {}
  for slot = 1, self._n do procs[slot] = self:_worker_process(slot) end
  local ok, err = pcall(process._start_all, procs)
  for slot = 1, self._n do
    if procs[slot]._state == "started" then self:_started(slot, procs[slot]) end
  end
  if not ok then error(err, 0) end
end

-- Start slot's worker anew (a restart)
function Pool:_spawn(slot)
  local p = self:_worker_process(slot)
  p:start()
  self:_started(slot, p)
end

-- Replacing a worker can fail for a while (the fork server was killed and
-- its successor is not up, fork refused for lack of memory or processes).
-- A slot whose start failed is left vacant and tried again after a
-- back-off that doubles up to RESTART_MAX_WAIT; a pool with no worker left
-- whose starts failed RESTART_TRIES times in a row is broken with the
-- reason, so that its tasks fail instead of waiting for a worker that
-- never comes.
local RESTART_WAIT, RESTART_MAX_WAIT, RESTART_TRIES = 0.05, 1, 5

function Pool:_restart(slot)
  local ok, err = pcall(self._spawn, self, slot)
  local vacant = self._vacant             -- slot -> { tries =, at = }, or nil
  if ok then
    self._restarts = self._restarts + 1
    if vacant then
      vacant[slot] = nil
      if next(vacant) == nil then self._vacant = nil end
    end
    return
  end
  self._pc:close_slot(slot)               -- the channel opened for it
  if log.enabled("WARN") then
    log.warn("pool worker %d could not be started: %s", slot,
             type(err) == "table" and err.message or tostring(err))
  end
  if not vacant then vacant = {}; self._vacant = vacant end
  local v = vacant[slot] or { tries = 0 }
  vacant[slot] = v
  v.tries = v.tries + 1
  v.at = monotonic() + math_min(RESTART_WAIT * 2 ^ (v.tries - 1), RESTART_MAX_WAIT)
  if self._nworkers == 0 and v.tries >= RESTART_TRIES then
    local why = type(err) == "table" and err.message or tostring(err)
    self:_break(errors.new("ProcessError", ("Pool: no worker is left and none could be "
      .. "started (%d tries): %s; the pool is broken"):format(v.tries, why)))
  end
end

-- Try again the vacant slots whose back-off has run out; the seconds
-- until the next one is due (nil: none is vacant any more). A start that
-- works counts in stats().restarts; failed tries do not.
function Pool:_retry_vacant()
  local vacant, now = self._vacant, monotonic()
  for slot, v in pairs(vacant) do
    if self._broken or self._state == "terminated"
       or (self._state ~= "running" and self._active == 0) then
      vacant[slot] = nil
    elseif v.at <= now then
      self:_restart(slot)
    end
  end
  local next_at
  for _, v in pairs(vacant) do
    if not next_at or v.at < next_at then next_at = v.at end
  end
  if not next_at then self._vacant = nil; return nil end
  return math_max(next_at - monotonic(), 0)
end

-- A worker ended (its sentinel fired or its channel closed): read what it
-- sent, reap it, settle the chunks it held (scheduler's _lost_chunks),
-- then replace it, or break the pool if it never became ready.
function Pool:_death(slot)
  local pc = self._pc
  pc:fill(slot)
  self:_drain(slot)
  local w = self._workers[slot]
  if not w then return end
  local p = w.proc
  local code = p:join(2)
  if not code then p:kill(); code = p:join(2) or -9 end
  local started, finished, ready = pc:started(slot)
  self._workers[slot] = nil
  self._nworkers = self._nworkers - 1
  pc:close_slot(slot)
  p:close()
  self:_lost_chunks(w, code, started, finished)
  if self._state == "terminated" or self._broken then return end
  if log.enabled("INFO") and not (w.exit_sent or w.retiring) then
    log.info("pool worker %d (pid %d) %s; %s", slot, w.pid,
             code < 0 and ("killed by signal " .. -code) or ("exited with code " .. code),
             (self._state == "running" or self._active > 0) and "replacing it" or "not replaced")
  end
  -- A worker that left on its own before it was ready would be followed by
  -- replacements that fail the same way (an initializer that calls
  -- os.exit; under spawn and forkserver an entry chunk that raises, e.g.
  -- the guard's error): the pool is broken instead. One that was killed
  -- (code < 0) is replaced.
  if not ready and code >= 0 and not w.exit_sent then
    self:_break(errors.new("ProcessError", ("Pool: worker (pid %d) exited with code %d before "
      .. "it was ready to run tasks: its initializer%s failed (see its stderr); the pool is "
      .. "broken"):format(w.pid, code, self._method == "fork" and ""
        or " or the re-run of the program's entry chunk (under " .. self._method .. ")"),
      { pid = w.pid, exitcode = code }))
    return
  end
  if self._state == "running" or self._active > 0 then
    self:_restart(slot)
    if self._state == "closed" and self._active == 0 then self:_exit_workers() end
  end
end

-- The pool cannot run tasks (its initializer raised, a worker left before
-- it was ready, or no worker is left and none can be started): fail
-- them all; later calls raise err.
function Pool:_break(err)
  if self._broken then return end
  self._broken = err
  self:_abort(err)
  self:_kill_all(true)
end

-- Tell every worker to leave once its queued chunks are done.
function Pool:_exit_workers()
  for slot, w in pairs(self._workers) do
    if not w.exit_sent then
      self._pc:ctl(slot, "exit")
      w.exit_sent = true
    end
  end
  self._pc:flush()
end

-- Signal every worker (hard: SIGKILL, else SIGTERM) and reap them all
-- within about a second (SIGKILL for those that linger); fds released.
function Pool:_kill_all(hard)
  for _, w in pairs(self._workers) do
    if hard then w.proc:kill() else w.proc:terminate() end
  end
  local deadline = monotonic() + 1
  for slot, w in pairs(self._workers) do
    local left = math_max(deadline - monotonic(), 0)
    if not w.proc:join(left) then w.proc:kill(); w.proc:join(1) end
    self._pc:close_slot(slot)
    w.proc:close()
  end
  self._workers, self._nworkers, self._vacant = {}, 0, nil
end

return { methods = Pool }
