-- multiprocessing.pool: Pool and AsyncResult, a supervised worker farm.
--
-- The parent knows which worker holds which task (docs/design.md,
-- decision 6): work is cut into chunks, each chunk goes to one chosen
-- worker over that worker's own channel (csrc/pool.c), and each worker
-- keeps a FIFO of the chunks it holds. When a worker ends, what it had
-- finished is read first; then the chunk it was running (the shared page
-- says which) fails with WorkerLostError, or TimeoutError when the parent
-- killed it for a task timeout, chunks it finished without sending their
-- results fail too, the chunks it had not started go back to the queue,
-- and a new worker takes its slot.
--
-- No threads (decision 7): the parent moves only when the program calls into
-- the pool (get, wait, map, imap's iterator, poll, join); callbacks run
-- from those calls. pool:fileno() is one fd (epoll) an event loop can
-- watch, a timerfd inside it included, so task timeouts wake it too.
--
-- Start methods: a forked worker inherits the Pool and serves its slot of
-- the PoolCore; a spawned or forkserver worker (restarts use the pool's
-- method too) gets a plain table with a PoolWorker handle to its slot and
-- the initializer through the codec (spawned_worker_main). The parent's
-- side is the same under every method.
--
-- Pipelining: a worker holds one chunk until the function's time per item
-- is known; fast functions then get chunks worth about QUEUED_US of work
-- in flight per worker, 4 to 64 of them (so chunksize 1 is cheap), slow
-- ones 1 or 2 (so a long task never queues behind another while a worker
-- is free).

local core = require "multiprocessing.core"
local errors = require "multiprocessing.errors"
local process = require "multiprocessing.process"

local type, error, pairs, next, tostring, setmetatable, xpcall, pcall =
      type, error, pairs, next, tostring, setmetatable, xpcall, pcall
local math_huge, math_min, math_max, ceil = math.huge, math.min, math.max, math.ceil
local unpack, traceback = table.unpack, debug.traceback
local monotonic, dumpfn = core.monotonic, core.pool_dumpfn
local stderr = io.stderr

local M = {}
local exports = {}
M.exports = exports

local MAXFN = 256          -- cached functions before the caches are cleared
local FAST_US = 1000       -- a chunk this quick may be deeply pipelined
local MEDIUM_US = 100000
-- A fast function's worker holds chunks worth about this much work (4 to
-- 64 chunks): enough to stay busy while the parent reads results, and no
-- more, since every queued chunk is buffer memory that must be touched
-- (page faults measured as the larger part of a first big map's cost).
local QUEUED_US = 200
-- The automatic chunksize's cap: the cost of a chunk is already small next
-- to 1024 items, and smaller chunks keep every process busy (pipelining).
local MAX_AUTO_CHUNK = 1024

local NO_OPTS = setmetatable({}, { __newindex = function() error("read-only") end })

local Pool = {}
Pool.__index = Pool
local AsyncResult = {}
AsyncResult.__index = AsyncResult

local function perr(msg, level)
  error(errors.new("ProcessError", msg), (level or 1) + 1)
end

-- ---- the worker's side -------------------------------------------------

local RUNNER_LINE = "\n\t%[C%]: in function 'multiprocessing%.core%._pool_runner'"

-- Message handler in a worker: the error as data, with the traceback of
-- the task's own frames only.
local function worker_msgh(err)
  local tb = traceback("", 2)
  local cut = tb:find(RUNNER_LINE)
  if cut then tb = tb:sub(1, cut - 1) end
  tb = tb:gsub("^\n", "")
  return errors.to_data(err, core.getpid(), tb)
end

local function worker_main(ref, slot)
  local pool = ref[1]                     -- the caller's frames hold it too
  local pc = pool._pc
  pc:drop_inherited(slot)                 -- other pools, sibling channels
  local init = pool._initializer
  if init then
    local args = pool._initargs
    local ok, data = xpcall(init, worker_msgh, unpack(args, 1, args.n or #args))
    if not ok then
      pc:initfail(slot, data)
      error("Pool initializer failed: " .. tostring(data.message) .. "\n"
            .. tostring(data.traceback), 0)
    end
  end
  return pc:worker(slot, pool._maxtasks, pool._maxmem, worker_msgh)
end

-- The entry of a worker that is not forked (spawn, forkserver): it gets a
-- plain table { PoolWorker handle, initializer, initargs, maxtasks, maxmem }
-- through the Process's arguments (the codec). It is no field of this
-- module, so it travels as bytecode whose upvalues are modules and C
-- functions: a worker never loads this module.
local function spawned_worker_main(t)
  local wh, init = t[1], t[2]
  if init then
    local args = t[3] or {}
    local ok, data = xpcall(init, worker_msgh, unpack(args, 1, args.n or #args))
    if not ok then
      wh:initfail(data)
      error("Pool initializer failed: " .. tostring(data.message) .. "\n"
            .. tostring(data.traceback), 0)
    end
  end
  return wh:serve(t[4], t[5], worker_msgh)
end

-- ---- errors ------------------------------------------------------------

local function remote_error(data)
  if type(data) ~= "table" then
    return errors.new("RemoteError", tostring(data))
  end
  return errors.new("RemoteError", data.message,
                    { traceback = data.traceback, pid = data.pid,
                      remote_type = data.type })
end

-- ---- construction ------------------------------------------------------

local MAX_PROCESSES = 4096     -- csrc/pool.c's bound on slots

local OPTIONS = { processes = true, initializer = true, initargs = true,
                  maxtasksperchild = true, max_memory_per_child = true }

local function check_count(v, what, level)
  if v ~= nil and (math.type(v) ~= "integer" or v < 1) then
    error("Pool: '" .. what .. "' must be an integer >= 1 (got " .. tostring(v) .. ")", level + 1)
  end
end

-- mp.Pool([n] | {processes=, initializer=, initargs=, maxtasksperchild=,
--   max_memory_per_child=}) -> Pool
function exports.Pool(opts)
  if type(opts) == "number" or opts == nil then opts = { processes = opts }
  elseif type(opts) ~= "table" then
    error("bad argument #1 to 'Pool' (number or table expected, got " .. type(opts) .. ")", 2)
  end
  for k in pairs(opts) do
    if not OPTIONS[k] then error("Pool: unknown option '" .. tostring(k) .. "'", 2) end
  end
  local n = opts.processes
  if n ~= nil and (math.type(n) ~= "integer" or n < 1 or n > MAX_PROCESSES) then
    error("Pool: 'processes' must be an integer in 1.." .. MAX_PROCESSES .. " (got "
          .. tostring(n) .. ")", 2)
  end
  n = n or core.cpu_count()
  if opts.initializer ~= nil and type(opts.initializer) ~= "function" then
    error("Pool: 'initializer' must be a function (got " .. type(opts.initializer) .. ")", 2)
  end
  if opts.initargs ~= nil and type(opts.initargs) ~= "table" then
    error("Pool: 'initargs' must be a table (got " .. type(opts.initargs) .. ")", 2)
  end
  check_count(opts.maxtasksperchild, "maxtasksperchild", 2)
  local mm = opts.max_memory_per_child
  if mm ~= nil and (type(mm) ~= "number" or mm <= 0) then
    error("Pool: 'max_memory_per_child' must be a number of bytes > 0 (got " .. tostring(mm) .. ")", 2)
  end
  -- Forked workers inherit the pool's engine; the others (spawn,
  -- forkserver) receive a handle to their slot (see spawned_worker_main).
  local method = process._default_method()
  if process._start_guard then process._start_guard() end   -- spawn's guard
  local pc = core.pool_new(n, method ~= "fork")
  -- (32 fields: a table of at most 32 keys has half the hash part; the
  -- options, mostly absent, are set after)
  local self = setmetatable({
    _pc = pc, _n = n, _state = "running", _owner = core.getpid(),
    _initargs = opts.initargs or {},
    _workers = {}, _seq = 0, _rr = 0,
    _cjob = {}, _cfirst = {}, _cn = {}, _cdeadline = {}, _ctimedout = {},
    _timed = {}, _ntimed = 0,
    _jobs = {}, _jobhead = 1, _jobtail = 1, _active = 0, _unfinished = {},
    _fnids = {}, _nfn = 0, _fncount = 0, _ewma = {},
    _cbq = {}, _cbhead = 1, _cbtail = 1,
    _done = 0, _failed = 0, _restarts = 0, _nworkers = 0,
    _method = method,                     -- workers (restarts too) use it
  }, Pool)
  self._initializer, self._maxtasks, self._maxmem = opts.initializer, opts.maxtasksperchild, mm
  local ok, err = pcall(self._start_workers, self)
  if not ok then                          -- e.g. an initializer that cannot travel
    self:terminate()
    error(err, 2)
  end
  return self
end

local WEAK_VALUES = { __mode = "v" }

-- A slot's worker Process, not started yet (its channel opened)
function Pool:_worker_process(slot)
  local pc = self._pc
  pc:open(slot)
  if self._method == "fork" then
    -- the worker's Process (kept by process.lua until joined) must not keep
    -- the pool alive, or a forgotten pool would never be collected
    local ref = setmetatable({ self }, WEAK_VALUES)
    local p = process._new({ target = worker_main, args = { ref, slot }, daemon = true,
                             name = "PoolWorker-" .. slot, _method = "fork" })
    -- with no initializer to run at its start, the worker waits in C for
    -- its first frame: one that only ever gets EXIT leaves without Lua
    if not self._initializer then pc:lazy(slot, p) end
    return p
  end
  return process._new({
    target = spawned_worker_main,
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

-- ---- jobs and dispatch -------------------------------------------------

-- An iterator input is read no further ahead of the consumer than this
-- many items (an abandoned imap over an endless iterator stops there).
local WINDOW_MIN = 256

local function has_work(job)
  if job.retry[1] then return true end
  if job.list then return job.cursor <= job.total end
  return not job.exhausted and job.cursor - 1 - job.consumed < job.window
end

-- Next range of up to maxn items of job: first, n (nil when none now).
local function take_chunk(job, maxn)
  local r = job.retry
  local k = #r
  if k > 0 then
    local first, n = r[k][1], r[k][2]
    if n > maxn then
      r[k][1], r[k][2] = first + maxn, n - maxn
      return first, maxn
    end
    r[k] = nil
    return first, n
  end
  local want = math_min(job.chunksize, maxn)
  local first = job.cursor
  if job.list then
    local n = math_min(want, job.total - first + 1)
    if n <= 0 then return nil end
    job.cursor = first + n
    return first, n
  end
  if job.exhausted then return nil end
  want = math_min(want, job.window - (first - 1 - job.consumed))
  if want <= 0 then return nil end
  local items, iter, n = job.items, job.iter, 0
  while n < want do
    local ok, v = pcall(iter)
    if not ok then
      job.exhausted = true
      job.total = first + n - 1
      job.iter_error = v
      break
    end
    if v == nil then
      job.exhausted = true
      job.total = first + n - 1
      break
    end
    items[first + n] = v
    n = n + 1
  end
  job.cursor = first + n
  if n == 0 then return nil end
  return first, n
end

-- Chunks a worker may hold for job (1 until the function's speed is known).
function Pool:_depth(job)
  local per = self._ewma[job.fnid]
  if not per then return job.mode == "map" and 2 or 1 end
  local est = per * job.chunksize
  if est < FAST_US then
    return est > 0 and math_max(4, math_min(64, QUEUED_US // est)) or 64
  end
  if est < MEDIUM_US then return 2 end
  return 1
end

function Pool:_queue_job(job)
  if not job.queued then
    job.queued = true
    local t = self._jobtail                -- not #: the head of the list has holes
    self._jobs[t] = job
    self._jobtail = t + 1
  end
end

-- The first queued job with work to hand out (finished heads are dropped).
function Pool:_head_job()
  local jobs, h = self._jobs, self._jobhead
  while true do
    local job = jobs[h]
    if not job then
      if h > 1 then self._jobs, self._jobhead, self._jobtail = {}, 1, 1 end
      return nil
    end
    if has_work(job) then self._jobhead = h return job end
    job.queued = false
    jobs[h] = nil
    h = h + 1
    self._jobhead = h
    if job.list == nil and job.exhausted then self:_check_done(job) end
  end
end

function Pool:_send(slot, w, job, first, n)
  local pc = self._pc
  local seq = self._seq + 1
  self._seq = seq
  local fnid = job.fnid
  if not w.sent[fnid] then
    pc:def(slot, fnid, job.fnbytes)
    w.sent[fnid] = true
  end
  local ok, err = pcall(pc.task, pc, slot, seq, fnid, job.star,
                        job.list or job.items, first, first + n - 1)
  if not ok then                       -- an item could not be serialized
    if type(err) ~= "table" then err = errors.new("SerializationError", tostring(err)) end
    for i = first, first + n - 1 do self:_fail_item(job, i, err) end
    if job.items then
      for i = first, first + n - 1 do job.items[i] = nil end
    end
    job.ndone = job.ndone + n
    self._done = self._done + n
    self:_check_done(job)
    return
  end
  self._cjob[seq], self._cfirst[seq], self._cn[seq] = job, first, n
  w.fifo[w.tail] = seq
  w.tail = w.tail + 1
  w.inflight = w.inflight + 1
  w.items = w.items + n
  if job.timeout then
    self._cdeadline[seq] = monotonic() + job.timeout
    self._timed[seq] = slot
    self._ntimed = self._ntimed + 1
    w.exclusive = seq
    self:_arm()
  end
end

function Pool:_dispatch()
  if self._state == "terminated" or self._broken then return end
  local job = self:_head_job()
  if not job then return end
  local n, workers, maxtasks = self._n, self._workers, self._maxtasks
  local start = self._rr
  for i = 1, n do
    local slot = (start + i - 1) % n + 1
    local w = workers[slot]
    while w and not w.exclusive and not w.retiring do
      job = self:_head_job()
      if not job then self._rr = slot return end
      local maxn = math_huge
      if maxtasks then
        maxn = maxtasks - w.items
        if maxn <= 0 then break end
      end
      if job.timeout then
        if w.inflight > 0 then break end
        maxn = 1
      elseif w.inflight >= self:_depth(job) then
        break
      end
      local first, cnt = take_chunk(job, maxn)
      if first then self:_send(slot, w, job, first, cnt)
      else self:_check_done(job) end
    end
  end
  self._rr = start % n + 1
end

-- A forked child has a copy of the pool, which must not touch the
-- parent's workers.
function Pool:_own(level)
  if core.getpid() ~= self._owner then
    perr("this Pool belongs to process " .. self._owner .. ", not to this one", level + 1)
  end
end

-- mode: "apply" (one call, all its results), "map" (first results in a
-- list), "imap", "imapu"
function Pool:_submit(mode, fn, xs, star, opts, level)
  level = level + 1
  self:_own(level)
  if self._state ~= "running" then
    perr("Pool not running (it was " .. self._state .. ")", level)
  end
  if self._broken then error(self._broken, level) end
  if type(fn) ~= "function" then
    error("bad argument #1 (function expected, got " .. type(fn) .. ")", level)
  end
  local fnbytes = dumpfn(fn)
  local fnid = self._fnids[fnbytes]
  if not fnid then
    if self._fncount >= MAXFN then
      self._fnids, self._fncount, self._ewma = {}, 0, {}
      for slot, w in pairs(self._workers) do
        self._pc:ctl(slot, "clear")
        w.sent = {}
      end
    end
    self._nfn = self._nfn + 1
    fnid = self._nfn
    self._fnids[fnbytes] = fnid
    self._fncount = self._fncount + 1
  end
  local job = { pool = self, mode = mode, fnid = fnid, fnbytes = fnbytes,
                star = star, cursor = 1, retry = {}, results = {}, errs = {},
                ndone = 0, nfail = 0, packed = mode ~= "map" }
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
    error("bad argument #2 (table or iterator function expected, got " .. type(xs) .. ")", level)
  end
  if mode == "imapu" then job.order, job.ohead, job.otail = {}, 1, 1 end
  if type(opts) == "number" then opts = { chunksize = opts } end
  opts = opts or NO_OPTS
  if type(opts) ~= "table" then
    error("bad argument #3 (chunksize or options table expected, got " .. type(opts) .. ")", level)
  end
  for k, v in pairs(opts) do
    if k == "chunksize" then
      if math.type(v) ~= "integer" or v < 1 then
        error("'chunksize' must be an integer >= 1 (got " .. tostring(v) .. ")", level)
      end
      if mode ~= "apply" then job.chunksize = v end
    elseif k == "callback" or k == "error_callback" then
      if type(v) ~= "function" then
        error("'" .. k .. "' must be a function (got " .. type(v) .. ")", level)
      end
      job[k] = v
    elseif k == "timeout" and mode == "apply" then
      if type(v) ~= "number" or v < 0 or v ~= v then
        error("'timeout' must be a number >= 0 (got " .. tostring(v) .. ")", level)
      end
      job.timeout = v
    elseif k == "progress" and mode ~= "apply" then
      if v ~= true and v ~= false and type(v) ~= "function" then
        error("'progress' must be true or a function (got " .. type(v) .. ")", level)
      end
      if v == true then
        if core.isatty(2) then job.progress = true end
      elseif v then
        job.progress = v
      end
    else
      error("unknown option '" .. tostring(k) .. "'", level)
    end
  end
  if job.iter then
    job.window = math_max(WINDOW_MIN, 4 * self._n * (job.chunksize or 1))
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
    for i = 1, job.total do
      if type(job.list[i]) ~= "table" then
        error("bad argument #2 (item " .. i .. " is not a table of arguments)", level)
      end
    end
  end
  self._active = self._active + 1
  self._unfinished[job] = true
  self:_queue_job(job)
  if job.total == 0 then self:_check_done(job) end
  self:_dispatch()
  self._pc:flush()
  return job
end

-- ---- results -----------------------------------------------------------

function Pool:_fail_item(job, pos, err)
  if job.errs[pos] == nil then
    job.errs[pos] = err
    job.nfail = job.nfail + 1
    self._failed = self._failed + 1
    if not job.first_err or pos < job.first_err_pos then
      job.first_err, job.first_err_pos = err, pos
    end
    if job.order then job.order[job.otail] = pos; job.otail = job.otail + 1 end
  end
end

-- Queue a callback (f false: job arg's progress) for the end of the step.
function Pool:_later(f, arg)
  local t = self._cbtail                  -- not #: the head of the queue has holes
  self._cbq[t] = { f, arg }
  self._cbtail = t + 1
end

function Pool:_check_done(job)
  if job.done then return end
  if job.total and job.ndone >= job.total and not has_work(job) then
    job.done = true
    self._active = self._active - 1
    self._unfinished[job] = nil
    if job.iter_error and not job.first_err then
      job.first_err = job.iter_error
      job.first_err_pos = math_huge
    end
    if job.mode == "map" then job.results.n = job.total end
    if job.first_err then
      if job.error_callback then self:_later(job.error_callback, job.first_err) end
    elseif job.callback then
      self:_later(job.callback, job)
    end
    if job.progress and not job.progress_dirty then
      job.progress_dirty = true
      self:_later(false, job)
    end
    if self._state == "closed" and self._active == 0 then self:_exit_workers() end
  end
end

function Pool:_result(slot, w, seq, n, us)
  local fifo = w.fifo
  -- results come in the order the chunks were sent
  fifo[w.head] = nil
  w.head = w.head + 1
  w.inflight = w.inflight - 1
  if w.exclusive == seq then w.exclusive = nil end
  if self._timed[seq] then
    self._timed[seq] = nil
    self._ntimed = self._ntimed - 1
  end
  local job, first = self._cjob[seq], self._cfirst[seq]
  self._cjob[seq], self._cfirst[seq], self._cn[seq] = nil, nil, nil
  self._cdeadline[seq], self._ctimedout[seq] = nil, nil
  if not job then return end
  local ok, nerr, errs = pcall(self._pc.take, self._pc, slot, job.results, first, job.packed)
  if not ok then
    local e = type(nerr) == "table" and nerr or errors.new("SerializationError", tostring(nerr))
    for i = first, first + n - 1 do self:_fail_item(job, i, e) end
  elseif nerr > 0 then
    for k, data in pairs(errs) do self:_fail_item(job, first + k - 1, remote_error(data)) end
  end
  local per = us / n
  local e = self._ewma[job.fnid]
  self._ewma[job.fnid] = e and (e * 0.7 + per * 0.3) or per
  if job.items then
    local items = job.items
    for i = first, first + n - 1 do items[i] = nil end
  end
  if job.order then
    local order, errs2, t = job.order, job.errs, job.otail
    for i = first, first + n - 1 do
      if errs2[i] == nil then order[t] = i; t = t + 1 end
    end
    job.otail = t
  end
  job.ndone = job.ndone + n
  self._done = self._done + n
  if job.progress and not job.progress_dirty then
    job.progress_dirty = true
    self:_later(false, job)
  end
  self:_check_done(job)
end

-- Read every whole frame slot's channel holds.
function Pool:_drain(slot)
  local pc, w = self._pc, self._workers[slot]
  if not w then return end
  while true do
    local kind, seq, n, us = pc:next(slot)
    if not kind then return end
    if kind == "result" then self:_result(slot, w, seq, n, us)
    elseif kind == "retire" then w.retiring = true
    elseif kind == "initfail" then
      local e = remote_error(seq)
      e.message = "Pool initializer failed: " .. tostring(e.message)
      self:_break(e)
      return
    end
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

-- Fail every unfinished job with err (terminate, broken pool).
function Pool:_abort(err)
  for job in pairs(self._unfinished) do
    job.retry, job.cursor = {}, (job.total or job.cursor) + 1
    job.exhausted = true
    if not job.total then job.total = job.ndone end
    job.first_err = job.first_err or err
    job.first_err_pos = job.first_err_pos or 0
    job.aborted = err
    job.done = true
    self._unfinished[job] = nil
  end
  self._active = 0
  self._cjob, self._cfirst, self._cn = {}, {}, {}
  self._timed, self._ntimed = {}, 0
  self._jobs, self._jobhead, self._jobtail = {}, 1, 1
end

-- A worker ended (its sentinel fired or its channel closed).
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
  for i = w.head, w.tail - 1 do
    local seq = w.fifo[i]
    local job, first, n = self._cjob[seq], self._cfirst[seq], self._cn[seq]
    if job then
      local err
      local who = { pid = w.pid, exitcode = code }
      if self._ctimedout[seq] then
        err = errors.new("TimeoutError", ("task timed out after %g s; its worker (pid %d) "
                         .. "was killed and replaced"):format(job.timeout, w.pid), who)
      elseif seq == started and seq > finished then
        err = errors.new("WorkerLostError", ("worker (pid %d) died with exit code %d "
                         .. "while running this task"):format(w.pid, code), who)
      elseif seq <= finished then        -- done, but its result was held back
        err = errors.new("WorkerLostError", ("worker (pid %d) died with exit code %d "
                         .. "before sending this task's result"):format(w.pid, code), who)
      end
      if self._timed[seq] then
        self._timed[seq] = nil
        self._ntimed = self._ntimed - 1
      end
      self._cjob[seq], self._cfirst[seq], self._cn[seq] = nil, nil, nil
      self._cdeadline[seq], self._ctimedout[seq] = nil, nil
      if err then
        for k = first, first + n - 1 do self:_fail_item(job, k, err) end
        job.ndone = job.ndone + n
        self._done = self._done + n
        if job.items then for k = first, first + n - 1 do job.items[k] = nil end end
        self:_check_done(job)
      else                                 -- never started: hand it out again
        local r = job.retry
        r[#r + 1] = { first, n }
        self:_queue_job(job)
      end
    end
  end
  if self._state == "terminated" or self._broken then return end
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

function Pool:_arm()
  local best
  for seq in pairs(self._timed) do
    local d = self._cdeadline[seq]
    if d and (not best or d < best) then best = d end
  end
  if best then self._pc:timer(math_max(best - monotonic(), 1e-6))
  else self._pc:timer(nil) end
end

function Pool:_check_deadlines()
  local now = monotonic()
  for seq, slot in pairs(self._timed) do
    local d = self._cdeadline[seq]
    if d and d <= now and not self._ctimedout[seq] then
      self._ctimedout[seq] = true
      local w = self._workers[slot]
      if w then w.proc:kill() end
    end
  end
  local best
  for seq in pairs(self._timed) do
    if not self._ctimedout[seq] then
      local d = self._cdeadline[seq]
      if not best or d < best then best = d end
    end
  end
  if best then self._pc:timer(math_max(best - monotonic(), 1e-6))
  else self._pc:timer(nil) end
end

local function draw_bar(done, total)
  local width = 40
  local frac = total and total > 0 and done / total or 0
  local fill = math.floor(frac * width + 0.5)
  stderr:write(("\r[%s%s] %d/%s"):format(("#"):rep(fill), ("-"):rep(width - fill),
               done, total and tostring(total) or "?"))
  if total and done >= total then stderr:write("\n") end
end

function Pool:_run_callbacks()
  local q = self._cbq
  while self._cbhead < self._cbtail do
    local h = self._cbhead
    local item = q[h]
    q[h] = nil
    self._cbhead = h + 1
    local f, arg = item[1], item[2]
    if f == false then                     -- progress of job arg
      arg.progress_dirty = false
      if arg.progress == true then         -- at most 20 frames a second
        local now, done = monotonic(), arg.total and arg.ndone >= arg.total
        if done or not arg.bar_t or now - arg.bar_t >= 0.05 then
          arg.bar_t = now
          draw_bar(arg.ndone, arg.total)
        end
      else
        arg.progress(arg.ndone, arg.total)
      end
    elseif type(arg) == "table" and arg.pool == self then   -- callback(job results)
      if arg.mode == "apply" then
        local r = arg.results[1]
        f(unpack(r, 1, r.n))
      else
        f(arg.results)
      end
    else
      f(arg)
    end
  end
  if self._cbhead > 1 and self._cbhead == self._cbtail then
    self._cbq, self._cbhead, self._cbtail = {}, 1, 1
  end
end

-- One round: hand out work, wait up to timeout for news, take it in.
function Pool:_step(timeout)
  local pc = self._pc
  if self._state == "terminated" or self._state == "joined" then return end
  if self._vacant then
    local due = self:_retry_vacant()
    if due and (not timeout or due < timeout) then timeout = due end
  end
  self:_dispatch()
  local slots, timer = pc:wait(timeout)
  local workers = self._workers
  for i = 1, #slots do self:_drain(slots[i]) end
  for i = 1, #slots do
    local slot = slots[i]
    if workers[slot] and self._state ~= "terminated" then
      local ended, dead = pc:state(slot)
      if ended or dead then self:_death(slot) end
    end
  end
  if (timer or self._ntimed > 0) and self._state ~= "terminated" then self:_check_deadlines() end
  self:_dispatch()
  if self._cbhead < self._cbtail then self:_run_callbacks() end
end

-- Run steps until pred() or the deadline; true when pred() held.
function Pool:_until(pred, timeout)
  local deadline = timeout and monotonic() + timeout
  while not pred() do
    if self._state == "terminated" or self._state == "joined" then return pred() end
    local left
    if deadline then
      left = deadline - monotonic()
      if left <= 0 then return false end
    end
    self:_step(left)
  end
  return true
end

-- ---- public methods ----------------------------------------------------

local function new_result(job)
  return setmetatable({ _job = job }, AsyncResult)
end

local function opt_args(args, level)
  if args == nil then return {} end
  if type(args) ~= "table" then
    error("bad argument #2 (table of arguments expected, got " .. type(args) .. ")", level + 1)
  end
  return args
end

-- pool:apply_async(fn, args [, {callback=, error_callback=, timeout=}]) -> AsyncResult
function Pool:apply_async(fn, args, opts)
  args = opt_args(args, 2)
  dumpfn(args)                            -- raise now if it cannot travel
  return new_result(self:_submit("apply", fn, args, true, opts, 2))
end

-- pool:apply(fn, args) -> the call's results
function Pool:apply(fn, args)
  args = opt_args(args, 2)
  dumpfn(args)
  return new_result(self:_submit("apply", fn, args, true, nil, 2)):get()
end

-- pool:map_async(fn, list [, chunksize | opts]) -> AsyncResult (of a list)
function Pool:map_async(fn, xs, opts)
  return new_result(self:_submit("map", fn, xs, false, opts, 2))
end

-- pool:map(fn, list [, chunksize | opts]) -> list of first results (with .n)
function Pool:map(fn, xs, opts)
  return new_result(self:_submit("map", fn, xs, false, opts, 2)):get()
end

function Pool:starmap_async(fn, xs, opts)
  return new_result(self:_submit("map", fn, xs, true, opts, 2))
end

function Pool:starmap(fn, xs, opts)
  return new_result(self:_submit("map", fn, xs, true, opts, 2)):get()
end

-- The consumer of an imap took one more result: read further ahead.
local function consumed(pool, job)
  if job.consumed then
    job.consumed = job.consumed + 1
    if has_work(job) and not job.queued and not job.done then pool:_queue_job(job) end
  end
end

local function raise_item(job, pos)
  local e = job.errs[pos] or job.aborted
  error(e, 0)
end

-- pool:imap(fn, list_or_iterator [, chunksize | opts]) -> iterator giving
-- i, results... in input order
function Pool:imap(fn, xs, opts)
  local job = self:_submit("imap", fn, xs, false, opts, 2)
  local pos = 0
  local results, errs = job.results, job.errs
  return function()
    local want = pos + 1
    self:_until(function()
      return results[want] ~= nil or errs[want] ~= nil or job.aborted ~= nil
             or (job.total ~= nil and want > job.total and job.done == true)
    end)
    local r = results[want]
    if r ~= nil then
      pos = want
      results[want] = nil
      consumed(self, job)
      return want, unpack(r, 1, r.n)
    end
    if errs[want] ~= nil or job.aborted then
      pos = want
      consumed(self, job)
      raise_item(job, want)
    end
    if job.iter_error then
      local e = job.iter_error
      job.iter_error = nil
      error(e, 0)
    end
    return nil
  end
end

-- pool:imap_unordered(...) -> iterator giving i, results... as they finish
function Pool:imap_unordered(fn, xs, opts)
  local job = self:_submit("imapu", fn, xs, false, opts, 2)
  local results = job.results
  return function()
    self:_until(function()
      return job.order[job.ohead] ~= nil or job.aborted ~= nil or job.done == true
    end)
    local pos = job.order[job.ohead]
    if pos then
      job.order[job.ohead] = nil
      job.ohead = job.ohead + 1
      local r = results[pos]
      consumed(self, job)
      if r == nil then raise_item(job, pos) end
      results[pos] = nil
      return pos, unpack(r, 1, r.n)
    end
    if job.aborted then error(job.aborted, 0) end
    if job.iter_error then
      local e = job.iter_error
      job.iter_error = nil
      error(e, 0)
    end
    return nil
  end
end

-- pool:poll([timeout]) -> number of unfinished jobs; makes progress and runs
-- callbacks (for event loops: call it when pool:fileno() is readable)
function Pool:poll(timeout)
  if timeout ~= nil and (type(timeout) ~= "number" or timeout < 0) then
    error("bad argument #1 to 'poll' (timeout must be a number >= 0)", 2)
  end
  if self._state ~= "terminated" and self._state ~= "joined" then
    self:_step(timeout or 0)
  end
  return self._active
end

-- pool:fileno() -> fd that becomes readable when the pool has news
function Pool:fileno()
  if self._state == "terminated" or self._state == "joined" then
    perr("Pool is " .. self._state, 2)
  end
  return self._pc:fileno()
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

function Pool:_exit_workers()
  for slot, w in pairs(self._workers) do
    if not w.exit_sent then
      self._pc:ctl(slot, "exit")
      w.exit_sent = true
    end
  end
  self._pc:flush()
end

-- pool:close(): no more tasks; workers leave once the queued ones are done
function Pool:close()
  self:_own(2)
  if self._state == "running" then
    self._state = "closed"
    if self._active == 0 then self:_exit_workers() end
  end
end

-- Signal every worker (sig) and reap them all; fds released.
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
  self._pc:close()
end

-- pool:join(): wait for the workers to leave (after close or terminate)
function Pool:join()
  self:_own(2)
  if self._state == "running" then perr("Pool is still running: close or terminate it first", 2) end
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
  self._pc:close()
end

function Pool.__tostring(self)
  return ("<Pool(processes=%d, %s)>"):format(self._n, self._state)
end

Pool.__name = "multiprocessing.Pool"

-- ---- AsyncResult -------------------------------------------------------

-- r:ready() -> boolean (makes progress first)
function AsyncResult:ready()
  local job = self._job
  if not job.done then job.pool:_step(0) end
  return job.done == true
end

-- r:wait([timeout]) -> true when ready, false on timeout
function AsyncResult:wait(timeout)
  if timeout ~= nil and (type(timeout) ~= "number" or timeout < 0) then
    error("bad argument #1 to 'wait' (timeout must be a number >= 0)", 2)
  end
  local job = self._job
  return job.pool:_until(function() return job.done == true end, timeout)
end

-- r:successful() -> boolean; raises when not ready
function AsyncResult:successful()
  if not self:ready() then perr("result is not ready", 2) end
  return self._job.first_err == nil
end

-- r:get([timeout]) -> the results | nil, "timeout"; raises the task's error
function AsyncResult:get(timeout)
  if timeout ~= nil and (type(timeout) ~= "number" or timeout < 0) then
    error("bad argument #1 to 'get' (timeout must be a number >= 0)", 2)
  end
  local job = self._job
  if not job.done then                    -- (the hot path of a round trip)
    local pool = job.pool
    local deadline = timeout and monotonic() + timeout
    repeat
      local st = pool._state
      if st == "terminated" or st == "joined" then break end
      local left
      if deadline then
        left = deadline - monotonic()
        if left <= 0 then break end
      end
      pool:_step(left)
    until job.done
    if not job.done then return nil, "timeout" end
  end
  if job.first_err then error(job.first_err, 0) end
  if job.mode == "apply" then
    local r = job.results[1]
    return unpack(r, 1, r.n)
  end
  return job.results
end

function AsyncResult.__tostring(self)
  return ("<AsyncResult(%s)>"):format(self._job.done and "ready" or "pending")
end

M.Pool = Pool
M.AsyncResult = AsyncResult
return M
