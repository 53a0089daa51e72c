-- multiprocessing.cluster: the Pool API across machines, on Redis streams
-- (docs/cluster.md). cluster.Pool{...} is the client: it adds signed tasks
-- to the queue's stream and reads its own result stream; cluster.serve
-- (cluster/worker.lua) runs on each machine with a local mp.Pool.
--
-- A map is cut into chunks, one stream entry each (a worker spreads a
-- chunk over its processes with map_async), so that 10,000 small tasks are
-- a few dozen Redis entries. A task's result reaches its client once: the
-- client keeps the numbers of its unfinished tasks and drops any second
-- result (a task run twice after a lease ran out). A result that fails
-- its signature check is dropped and counted (stats().refused).

local core = require "multiprocessing.core"
local auth = require "multiprocessing.auth"
local errors = require "multiprocessing.errors"
local check = require "multiprocessing.check"
local polling = require "multiprocessing.polling"
local results = require "multiprocessing.pool_results"
local conn = require "multiprocessing.cluster.conn"
local wire = require "multiprocessing.cluster.wire"
local worker = require "multiprocessing.cluster.worker"

local type, tostring, pairs, ipairs, error, setmetatable, pcall =
      type, tostring, pairs, ipairs, error, setmetatable, pcall
local unpack, pack = table.unpack, table.pack
local math_min, math_max, math_ceil = math.min, math.max, math.ceil
local new_result = results.new

local M = {}
M.serve = worker.serve

-- The AsyncResults, the imap iterators and the callbacks are the local
-- Pool's (pool_results.lua): this Pool gives them the protocol they use
-- (_step, _until, _own, _cancel, _consumed, _fd, timeout, fileno, _state,
-- and jobs with the same fields).
local Pool = {}
Pool.__index = Pool
Pool.__name = "multiprocessing.cluster.Pool"
for k, f in pairs(results.methods) do Pool[k] = f end

local function perr(msg, level) error(errors.new("ProcessError", msg), level + 1) end

local OPTIONS = { redis = "string", queue = "string", authkey = "string",
  max_retries = true, lease = true, result_ttl = true, timeout = true, retry_for = true }

-- cluster.Pool{redis=, queue=, authkey=, max_retries=2, lease=10,
-- result_ttl=60, timeout=, retry_for=60} -> Pool
function M.Pool(o)
  if type(o) ~= "table" then check.argerror(1, "Pool", "options table expected, got "
                                            .. check.typename(o), 2) end
  check.options(o, 1, "Pool", OPTIONS, 2)
  for _, k in ipairs{ "redis", "queue", "authkey" } do
    if o[k] == nil then check.argerror(1, "Pool", "'" .. k .. "' is required", 2) end
  end
  local function num(k, default, min)
    local v = check.number(o[k], 1, "Pool", "'" .. k .. "'", min, 3)
    if v == nil then return default end
    return v
  end
  local max_retries = check.integer(o.max_retries, 1, "Pool", "'max_retries'", 0, nil, 2)
  local self = setmetatable({
    _keys = wire.keys(o.queue), _authkey = o.authkey,
    _max_retries = max_retries or 2,
    _lease = math.floor(num("lease", 10, 1) * 1000),
    _ttl = math.floor(num("result_ttl", 60, 1) * 1000),
    _timeout = num("timeout", nil, 0),
    _client = wire.hex(auth.random_bytes(8)),
    _n = 0, _tasks = {}, _ntasks = 0, _active = 0, _last = "0-0", _reading = false,
    _state = "running", _done = 0, _failed = 0, _refused = 0, _total = 0,
    _owner = core.getpid(), _expire_at = 0,
    _cbq = {}, _cbhead = 1, _cbtail = 1,       -- (pool_results.lua's callbacks)
  }, Pool)
  local copts = { retry_for = num("retry_for", nil, 0) }
  self._wc = conn.new(o.redis, copts)
  self._rc = conn.new(o.redis, copts)
  self._rkey = self._keys.result(self._client)
  wire.check_key(self._wc, self._keys, o.authkey, 2)
  return self
end

-- pool:_own(level): raises unless this process made the pool
function Pool:_own(level)
  if core.getpid() ~= self._owner then perr("cluster Pool used from another process", level + 1) end
end

-- The checks of a call that submits tasks.
function Pool:_running(level)
  self:_own(level + 1)
  if self._state ~= "running" then perr("Pool is not running", level + 1) end
end

-- Queue one stream entry for the task (sent by _send).
function Pool:_add(job, pos, count, task, cmds)
  self._n = self._n + 1
  local t = self._n
  task.c, task.t, task.lease = self._client, t, self._lease
  task.max_retries, task.ttl = self._max_retries, self._ttl
  local m = core.pool_dumps(task, "task")   -- a handle raises: Redis carries no fds
  self._tasks[t] = { job = job, pos = pos, count = count }
  self._ntasks = self._ntasks + 1
  cmds[#cmds + 1] = { "XADD", self._keys.tasks, "*", "c", self._client, "t", t,
                      "l", self._lease, "m", m, "s", wire.sign(self._authkey, m), t = t }
end

-- A submit that failed part way (an XADD refused, Redis out of reach, a
-- chunk that could not be encoded): forget the job's tasks Redis did not
-- get, else join() would wait for them forever; progress() adds up again.
function Pool:_abort(job, cmds)
  for i = 1, #cmds do
    local t = cmds[i].t
    local task = self._tasks[t]
    if task and not task.entry then self._tasks[t] = nil; self._ntasks = self._ntasks - 1 end
  end
  self._total = self._total - (job.total - (job.nsent or 0))
  if not job.dropped then                -- its caller got an error, not the job
    job.dropped = true
    self._active = self._active - 1
  end
end

-- Send the queued entries of one job; on a failure forget what was not
-- sent, then raise.
function Pool:_send(job, cmds)
  local ok, replies = pcall(self._wc.pipeline, self._wc, cmds)
  if not ok then self:_abort(job, cmds); error(replies, 0) end
  local bad
  for i, r in ipairs(replies) do
    local task = self._tasks[cmds[i].t]
    if r[1] == nil then bad = bad or r[2]
    elseif task then task.entry = r[1]; job.nsent = (job.nsent or 0) + task.count end
  end
  if bad then
    self:_abort(job, cmds)
    errors.raise("ProcessError", "cannot add the tasks to " .. self._keys.tasks
                 .. ": " .. tostring(bad), 4)           -- (the public method's caller)
  end
end

-- A job: the fields pool_results.lua reads (see there), and callback,
-- error_callback, progress, first_err_pos.
local function new_job(self, mode, total, opts)
  local job = { pool = self, mode = mode, total = total, ndone = 0, results = {}, errs = {},
                order = {}, ohead = 1, otail = 1 }
  if opts then
    job.callback, job.error_callback = opts.callback, opts.error_callback
    local progress = opts.progress
    if progress == true then
      if core.isatty(2) then job.progress = true end
    elseif progress then
      job.progress = progress
    end
  end
  self._total = self._total + total
  self._active = self._active + 1
  return job
end

-- The results side: _finish, _deliver, reading the result stream
-- (_read, _step), _cancel (cluster/results.lua).
require("multiprocessing.cluster.results").install(Pool)

-- ---- submitting --------------------------------------------------------

local APPLY_OPTS = { callback = "function", error_callback = "function", timeout = true }
local MAP_OPTS = { chunksize = true, callback = "function", error_callback = "function",
                   progress = true }

-- The job of one call (level 3: the caller of the public method).
function Pool:_apply(fname, fn, args, opts)
  local L = 3
  self:_running(L)
  if type(fn) ~= "function" then
    check.argerror(1, fname, "function expected, got " .. check.typename(fn), L)
  end
  if args ~= nil and type(args) ~= "table" then
    check.argerror(2, fname, "table of arguments expected, got " .. check.typename(args), L)
  end
  opts = check.options(opts, 3, fname, APPLY_OPTS, L)
  local timeout = check.number(opts.timeout, 3, fname, "'timeout'", 0, L)
  local job = new_job(self, "apply", 1, opts)
  local cmds = {}
  local ok, e = pcall(self._add, self, job, 1, 1, { mode = "apply", fn = fn, args = args or {},
                                                   timeout = timeout or self._timeout }, cmds)
  if not ok then self:_abort(job, cmds); error(e, 0) end
  self:_send(job, cmds)
  return job
end

-- pool:apply_async(fn, args [, {callback=, error_callback=, timeout=}]) -> AsyncResult
function Pool:apply_async(fn, args, opts)
  return new_result(self:_apply("apply_async", fn, args, opts))
end

-- pool:submit(fn, ...) -> AsyncResult: apply_async(fn, table.pack(...))
function Pool:submit(fn, ...)
  return new_result(self:_apply("submit", fn, pack(...), nil))
end

-- pool:apply(fn, args) -> the call's results
function Pool:apply(fn, args)
  return new_result(self:_apply("apply", fn, args, nil)):get()
end

-- The job of a map call (level 3: the caller of the public method): the
-- list cut into chunks, one stream entry each.
function Pool:_map(fname, mode, fn, xs, star, opts)
  local L = 3
  self:_running(L)
  if type(fn) ~= "function" then
    check.argerror(1, fname, "function expected, got " .. check.typename(fn), L)
  end
  if type(opts) == "number" then opts = { chunksize = opts }
  elseif opts ~= nil and type(opts) ~= "table" then
    check.argerror(3, fname, "chunksize or options table expected, got "
                   .. check.typename(opts), L)
  end
  opts = check.options(opts, 3, fname, MAP_OPTS, L)
  local size = check.integer(opts.chunksize, 3, fname, "'chunksize'", 1, nil, L)
  local progress = opts.progress
  if progress ~= nil and progress ~= true and progress ~= false
     and type(progress) ~= "function" then
    check.argerror(3, fname, "'progress' must be true or a function, got "
                   .. check.typename(progress), L)
  end
  local list = xs
  if type(xs) == "function" then                -- an iterator is read now
    list = {}
    for v in xs do list[#list + 1] = v end
  elseif type(xs) ~= "table" then
    check.argerror(2, fname, "table or iterator function expected, got "
                   .. check.typename(xs), L)
  end
  local n = list.n or #list
  if star then results.check_star_items(list, n, fname, L) end
  local job = new_job(self, mode, n, opts)
  if n == 0 then self:_finish(job) return job end
  if not size then
    local _, workers = wire.alive(self._wc, self._keys)
    size = math_max(1, math_ceil(n / (4 * math_max(workers, 2))))
  end
  local cmds = {}
  for first = 1, n, size do
    local last = math_min(n, first + size - 1)
    local ok, e = pcall(self._add, self, job, first, last - first + 1,
      { mode = "chunk", star = star, fn = fn, args = { unpack(list, first, last) } }, cmds)
    if not ok then self:_abort(job, cmds); error(e, 0) end
    if #cmds >= 256 then self:_send(job, cmds); cmds = {} end
  end
  if #cmds > 0 then self:_send(job, cmds) end
  return job
end

results.map_calls(Pool, "_map", "imap")   -- map, starmap, imap... (_async)

-- ---- for event loops, and numbers --------------------------------------

-- pool:poll([timeout]) -> number of unfinished jobs; makes progress and
-- runs callbacks (for event loops: call it when pool:fileno() is readable)
function Pool:poll(timeout)
  check.timeout(timeout, 1, "poll")
  self:_step(timeout or 0)
  return self._active
end

-- pool:_fd() -> the result connection's socket, with a read waiting in
-- Redis (so that it becomes readable when a result comes)
function Pool:_fd()
  if not self._reading then self:_arm() end
  return self._rc:fileno()
end

-- pool:fileno() -> fd that becomes readable when the pool has news (a
-- result, or the standing read's empty answer, at least once a second);
-- it changes when the connection to Redis is made again
function Pool:fileno()
  local st = self._state
  if st == "terminated" or st == "joined" then perr("Pool is " .. st, 2) end
  return self:_fd()
end

-- The polling protocol of cqueues (docs/eventloops.md): readable means
-- "call pool:poll() now"; timeout() is 0 while callbacks wait to run or
-- when news came that its socket does not show (an answer read with the
-- request, or no read waiting), nil otherwise.
function Pool:pollfd() return polling.remember(self, self:fileno()) end
Pool.events = polling.events
function Pool:timeout()
  if self._cbhead < self._cbtail then return 0 end
  local st = self._state
  if st == "terminated" or st == "joined" then return nil end
  if not self._reading or self._rc.early then return 0 end
  return nil
end

-- pool:stats() -> {machines, workers, queued, done, failed, refused}
function Pool:stats()
  local machines, workers = wire.alive(self._wc, self._keys)
  return { machines = machines, workers = workers, queued = self._ntasks,
           done = self._done, failed = self._failed, refused = self._refused }
end

-- pool:progress() -> done, total, workers alive
function Pool:progress()
  local _, workers = wire.alive(self._wc, self._keys)
  return self._done, self._total, workers
end

-- ---- lifecycle ---------------------------------------------------------

function Pool:close()
  if self._state == "running" then self._state = "closed" end
end

-- Remove what this client left in Redis: its result stream, and the
-- entries of its tasks that no worker finished.
function Pool:_cleanup()
  polling.forget(self)
  local cmds = { { "DEL", self._rkey } }
  for _, task in pairs(self._tasks) do
    if task.entry then
      cmds[#cmds + 1] = { "XACK", self._keys.tasks, wire.GROUP, task.entry }
      cmds[#cmds + 1] = { "XDEL", self._keys.tasks, task.entry }
    end
  end
  pcall(self._wc.pipeline, self._wc, cmds)
  self._wc:close(); self._rc:close()
end

function Pool:join()
  if self._state == "running" then perr("Pool is still running: close or terminate it first", 2) end
  if self._state ~= "closed" then return end
  self:_until(function() return self._ntasks == 0 end)
  self._state = "joined"
  self:_cleanup()
end

-- pool:terminate(): unfinished tasks fail with a ProcessError and are
-- taken off the queue; their done callbacks run (the first error one
-- raises is raised after them all)
function Pool:terminate()
  if self._state == "terminated" or self._state == "joined" then return end
  self._state = "terminated"
  if core.getpid() ~= self._owner then return end
  local err = errors.new("ProcessError", "Pool was terminated before the task finished")
  for _, task in pairs(self._tasks) do
    local job = task.job
    if not job.done then
      job.aborted, job.first_err = err, job.first_err or err
      self:_finish(job)
    end
  end
  self:_cleanup()
  self._tasks, self._ntasks, self._active = {}, 0, 0
  self:_run_all_callbacks()
end
Pool.__close = Pool.terminate

-- __gc: never blocks on the network: the connections are closed and the
-- result stream left to expire (result_ttl)
function Pool.__gc(self)
  if self._wc then self._wc:close() end
  if self._rc then self._rc:close() end
end

function Pool.__tostring(self)
  return ("<cluster.Pool(%s, %s)>"):format(self._keys.tasks, self._state)
end

M.AsyncResult = results.AsyncResult
M.PoolClass = Pool
return M
