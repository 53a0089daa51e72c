-- multiprocessing.pool: mp.Pool, a supervised worker farm: its
-- construction, its calls and its lifecycle.
--
-- The parent knows which worker holds which task (docs/design.md,
-- decision 6). The Pool is one object whose methods come from five
-- files, one job each:
--
--   pool.lua             the API: options, the calls (apply, submit, map,
--                        imap, ...), close, terminate, join, poll, fileno,
--                        the polling protocol, stats
--   pool_jobs.lua        the jobs: their queue, their items cut into
--                        ranges, their functions' ids, cancel
--   pool_scheduler.lua   the books: chunks, dispatch, results,
--                        deadlines, and the step that moves them
--   pool_supervisor.lua  the workers: start, death, restart, a broken pool
--   pool_results.lua     AsyncResult (futures too), as_completed, the imap
--                        iterators, callbacks, the map family's calls
--
-- and pool_worker.lua is the worker's side (it never loads the others).
-- The engine (channels, epoll set, timer, shared page) is C: the PoolCore
-- of csrc/pool.c, pool._pc.
--
-- No threads (decision 7): the parent moves only when the program calls
-- into the pool (get, wait, map, imap's iterator, poll, join); callbacks
-- run from those calls. pool:fileno() is one fd (epoll) an event loop can
-- watch, a timerfd inside it included, so task timeouts wake it too; the
-- Pool and its AsyncResults speak cqueues' polling protocol on it.

local core = require "multiprocessing.core"
local errors = require "multiprocessing.errors"
local process = require "multiprocessing.process"
local check = require "multiprocessing.check"
local codec = require "multiprocessing.codec"
local results = require "multiprocessing.pool_results"
local polling = require "multiprocessing.polling"

local type, error, pairs, ipairs, setmetatable, pcall =
      type, error, pairs, ipairs, setmetatable, pcall
local math_min, math_max, ceil = math.min, math.max, math.ceil
local dumpfn = core.pool_dumpfn
local new_result = results.new
local getupvalue = debug.getupvalue

-- The bytes of a function with no upvalue but _ENV (which travels as the
-- receiver's globals, whatever its value) do not change: they are made
-- once per function (the commonest task function: a local function of
-- the program). Any other closure is dumped at each call, since the
-- values of its upvalues travel with it; one whose upvalues hold handles
-- also gives copies of their fds, which its DEF frames carry.
local static_bytes = setmetatable({}, { __mode = "k" })
local function fn_bytes(fn)
  local b = static_bytes[fn]
  if b then return b end
  local fds
  b, fds = dumpfn(fn)
  if fds then return b, fds end
  local name = getupvalue(fn, 1)
  if name == nil or (name == "_ENV" and getupvalue(fn, 2) == nil) then
    static_bytes[fn] = b
  end
  return b
end

local M = {}
local exports = {}
M.exports = exports
exports.as_completed = results.as_completed

-- The automatic chunksize's cap: the cost of a chunk is already small next
-- to 1024 items, and smaller chunks keep every process busy (pipelining).
local MAX_AUTO_CHUNK = 1024
local MAX_PROCESSES = 4096     -- csrc/pool.c's bound on slots

local Pool = {}
Pool.__index = Pool
Pool.__name = "multiprocessing.Pool"
for _, part in ipairs { "pool_jobs", "pool_scheduler", "pool_supervisor", "pool_results" } do
  for k, f in pairs(require("multiprocessing." .. part).methods) do Pool[k] = f end
end

-- ---- construction ------------------------------------------------------

local POOL_OPTS = { processes = true, initializer = "function", initargs = "table",
                    maxtasksperchild = true, max_memory_per_child = true }

-- mp.Pool([n] | {processes=, initializer=, initargs=, maxtasksperchild=,
--   max_memory_per_child=}) -> Pool
function exports.Pool(opts)
  local t = type(opts)
  if t == "number" or opts == nil then opts = { processes = opts }
  elseif t ~= "table" then
    check.argerror(1, "Pool", "number or table expected, got " .. check.typename(opts))
  end
  check.options(opts, 1, "Pool", POOL_OPTS)
  local n = check.integer(opts.processes, 1, "Pool", "'processes'", 1, MAX_PROCESSES)
            or core.cpu_count()
  local maxtasks = check.integer(opts.maxtasksperchild, 1, "Pool", "'maxtasksperchild'", 1)
  local maxmem = check.positive(opts.max_memory_per_child, 1, "Pool", "'max_memory_per_child'")
  -- Forked workers inherit the pool's engine; the others (spawn,
  -- forkserver) receive a handle to their slot (pool_worker.lua).
  local method = process._default_method()
  if process._start_guard then process._start_guard() end   -- spawn's guard
  local pc = core.pool_new(n, method ~= "fork")
  -- (at most 32 fields here: a table of at most 32 keys has half the hash
  -- part; the options, mostly absent, are set after)
  local self = setmetatable({
    _pc = pc, _n = n, _state = "running", _owner = core.getpid(),
    _initargs = opts.initargs or {},
    _workers = {}, _nworkers = 0, _rr = 0,          -- (pool_supervisor.lua)
    _seq = 0, _timed = {}, _ntimed = 0,               -- (pool_scheduler.lua)
    _jobs = {}, _jobhead = 1, _jobtail = 1, _active = 0, _unfinished = {},  -- (pool_jobs.lua)
    _fnids = {}, _nfn = 0, _fncount = 0, _ewma = {},
    _cbq = {}, _cbhead = 1, _cbtail = 1,              -- (pool_results.lua)
    _done = 0, _failed = 0, _restarts = 0,
    _method = method,                     -- workers (restarts too) use it
  }, Pool)
  self._initializer, self._maxtasks, self._maxmem = opts.initializer, maxtasks, maxmem
  local ok, err = pcall(self._start_workers, self)
  if not ok then                          -- e.g. an initializer that cannot travel
    self:terminate()
    error(err, 2)
  end
  return self
end

-- ---- the calls ---------------------------------------------------------

-- A forked child has a copy of the pool, which must not touch the
-- parent's workers.
function Pool:_own(level)
  if core.getpid() ~= self._owner then
    errors.raise("ProcessError", "this Pool belongs to process " .. self._owner
                 .. ", not to this one", level + 1)
  end
end

local APPLY_OPTS = { chunksize = true, callback = "function", error_callback = "function",
                     timeout = true }
local MAP_OPTS = { chunksize = true, callback = "function", error_callback = "function",
                   progress = true }

-- The job of a call: mode "apply" (one call, all its results), "map"
-- (first results in a list), "imap", "imapu"; fname names the call in
-- messages. Always called by the public method: level 3 is the user's.
function Pool:_submit(fname, mode, fn, xs, star, opts)
  local L = 3
  self:_own(L)
  if self._state ~= "running" then
    errors.raise("ProcessError", "Pool not running (it was " .. self._state .. ")", L)
  end
  if self._broken then error(self._broken, L) end
  if type(fn) ~= "function" then
    check.argerror(1, fname, "function expected, got " .. check.typename(fn), L)
  end
  local fnbytes, fnfds = fn_bytes(fn)
  -- (the fields set later are named here too, so that the table is made
  -- with room for them: no rehash on the way of a round trip)
  local job = { pool = self, mode = mode, fnid = self:_fn_id(fnbytes, fnfds),
                fnbytes = fnbytes, fnfds = fnfds,
                star = star, cursor = 1, retry = {}, results = {}, errs = {},
                ndone = 0, nfail = 0, packed = mode ~= "map",
                list = nil, total = nil, chunksize = nil, queued = false,
                done = false, finished = nil }
  if mode == "apply" then
    job.list, job.total, job.chunksize = { xs }, 1, 1
  elseif type(xs) == "table" then
    job.list, job.total = xs, xs.n or #xs
    if mode == "map" then job.results = core.pool_table(job.total) end
  elseif type(xs) == "function" then
    if mode == "map" then                 -- map needs them all anyway
      local list, k = {}, 0
      for v in xs do k = k + 1; list[k] = v end
      job.list, job.total = list, k
    else
      job.iter, job.items, job.consumed = xs, {}, 0
    end
  else
    check.argerror(2, fname, "table or iterator function expected, got "
                   .. check.typename(xs), L)
  end
  if mode == "imapu" then job.order, job.ohead, job.otail = {}, 1, 1 end
  if type(opts) == "number" then opts = { chunksize = opts }
  elseif opts ~= nil and type(opts) ~= "table" then
    check.argerror(3, fname, "chunksize or options table expected, got "
                   .. check.typename(opts), L)
  end
  local progress
  if opts ~= nil then                     -- (none: the hot path of apply_async)
    opts = check.options(opts, 3, fname, mode == "apply" and APPLY_OPTS or MAP_OPTS, L)
    local chunksize = check.integer(opts.chunksize, 3, fname, "'chunksize'", 1, nil, L)
    if mode ~= "apply" then job.chunksize = chunksize end
    job.callback, job.error_callback = opts.callback, opts.error_callback
    job.timeout = check.number(opts.timeout, 3, fname, "'timeout'", 0, L)
    progress = opts.progress
  end
  if progress ~= nil and progress ~= true and progress ~= false
     and type(progress) ~= "function" then
    check.argerror(3, fname, "'progress' must be true or a function, got "
                   .. check.typename(progress), L)
  end
  if progress == true then
    if core.isatty(2) then job.progress = true end
  elseif progress then
    job.progress = progress
  end
  if not job.chunksize then
    if mode == "map" then                 -- Python's len / (4 * workers), capped
      local c = math_min(ceil(job.total / (4 * self._n)), MAX_AUTO_CHUNK)
      job.chunksize = c > 0 and c or 1
    else
      job.chunksize = 1
    end
  end
  if star and job.list and mode ~= "apply" then
    results.check_star_items(job.list, job.total, fname, L)
  end
  self:_add_job(job)
  return job
end

-- (level 3: the caller of the public method)
local function call_args(args, fname)
  if args == nil then return {} end
  if type(args) ~= "table" then
    check.argerror(2, fname, "table of arguments expected, got " .. check.typename(args), 3)
  end
  -- raise now if it cannot travel (plain values always can)
  for i = 1, args.n or #args do
    local t = type(args[i])
    if t ~= "number" and t ~= "string" and t ~= "boolean" and t ~= "nil" then
      codec.check(args, "args")
      break
    end
  end
  return args
end

-- pool:apply_async(fn, args [, {callback=, error_callback=, timeout=}]) -> AsyncResult
function Pool:apply_async(fn, args, opts)
  args = call_args(args, "apply_async")
  return new_result(self:_submit("apply_async", "apply", fn, args, true, opts))
end

-- pool:submit(fn, ...) -> AsyncResult: apply_async(fn, table.pack(...))
function Pool:submit(fn, ...)
  local args = call_args(table.pack(...), "submit")
  return new_result(self:_submit("submit", "apply", fn, args, true, nil))
end

-- pool:apply(fn, args) -> the call's results
function Pool:apply(fn, args)
  args = call_args(args, "apply")
  return new_result(self:_submit("apply", "apply", fn, args, true, nil)):get()
end

results.map_calls(Pool, "_submit", "imapu")   -- map, starmap, imap... (_async)

-- ---- for event loops, and numbers --------------------------------------

-- pool:poll([timeout]) -> number of unfinished jobs; makes progress and runs
-- callbacks (for event loops: call it when pool:fileno() is readable)
function Pool:poll(timeout)
  check.timeout(timeout, 1, "poll")
  if self._state ~= "terminated" and self._state ~= "joined" then
    self:_step(timeout or 0)
  end
  return self._active
end

-- pool:fileno() -> fd that becomes readable when the pool has news
function Pool:fileno()
  if self._state == "terminated" or self._state == "joined" then
    errors.raise("ProcessError", "Pool is " .. self._state, 2)
  end
  return self._pc:fileno()
end

-- pool:_fd() -> the same fd, unchecked (pool_results.lua's protocol: what
-- an AsyncResult and mp.as_completed wait on)
function Pool:_fd() return self._pc:fileno() end

-- The polling protocol of cqueues (docs/eventloops.md): pool:pollfd() is
-- pool:fileno(); readable means "call pool:poll() now". timeout() is 0
-- while callbacks wait to run (one raised), and the seconds until a
-- vacant worker slot is due to be tried again (the pool must be stepped
-- then, although its fd stays quiet); nil otherwise.
function Pool:pollfd() return polling.remember(self, self:fileno()) end
Pool.events = polling.events
function Pool:timeout()
  if self._cbhead < self._cbtail then return 0 end
  local vacant = self._vacant
  if not vacant then return nil end
  local at
  for _, v in pairs(vacant) do
    if not at or v.at < at then at = v.at end
  end
  return at and math_max(at - core.monotonic(), 0)
end

-- pool:stats() -> {workers, busy, queued, done, failed, restarts}
function Pool:stats()
  local busy = 0
  for _, w in pairs(self._workers) do if w.inflight > 0 then busy = busy + 1 end end
  local queued = 0
  for job in pairs(self._unfinished) do
    for _, r in pairs(job.retry) do queued = queued + r[2] end
    if job.list then queued = queued + math_max(0, job.total - job.cursor + 1) end
  end
  return { workers = self._nworkers, busy = busy, queued = queued, done = self._done,
           failed = self._failed, restarts = self._restarts }
end

-- ---- lifecycle ---------------------------------------------------------

-- pool:close(): no more tasks; workers leave once the queued ones are done
function Pool:close()
  self:_own(2)
  if self._state == "running" then
    self._state = "closed"
    if self._active == 0 then self:_exit_workers() end
  end
end

-- pool:terminate(): stop the workers now; unfinished tasks fail
function Pool:terminate()
  self:_own(2)
  if self._state == "terminated" then return end
  local was = self._state
  self._state = "terminated"
  if was ~= "joined" then
    self:_abort(errors.new("ProcessError", "Pool was terminated before the task finished"))
    self:_kill_all(false)
  end
  polling.forget(self)
  self._pc:close()
  -- the done callbacks of the tasks it failed (add_done_callback), and any
  -- left queued: all run
  self:_run_all_callbacks()
end

-- pool:join(): wait for the workers to leave (after close or terminate)
function Pool:join()
  self:_own(2)
  if self._state == "running" then
    errors.raise("ProcessError", "Pool is still running: close or terminate it first", 2)
  end
  if self._state == "terminated" or self._state == "joined" then return end
  self:_until(function() return self._active == 0 end)
  self:_exit_workers()
  for slot, w in pairs(self._workers) do
    w.proc:join()
    self._pc:close_slot(slot)
    w.proc:close()
  end
  self._workers, self._nworkers = {}, 0
  self._state = "joined"
  polling.forget(self)
  self._pc:close()
end

Pool.__close = Pool.terminate

-- __gc: never blocks long: SIGKILL and reap
function Pool.__gc(self)
  if self._state == "terminated" or self._state == "joined" then return end
  if core.getpid() ~= self._owner then return end
  self._state = "terminated"
  for _, w in pairs(self._workers) do
    pcall(w.proc.kill, w.proc)
    pcall(w.proc.join, w.proc, 1)
  end
  self._pc:close()              -- (no polling.forget: no cqueues call from a finalizer)
end

function Pool.__tostring(self)
  return ("<Pool(processes=%d, %s)>"):format(self._n, self._state)
end

M.Pool = Pool
M.AsyncResult = results.AsyncResult
return M
