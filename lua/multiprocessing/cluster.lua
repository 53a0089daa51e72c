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

local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local auth = require "multiprocessing.auth"
local errors = require "multiprocessing.errors"
local conn = require "multiprocessing.cluster.conn"
local wire = require "multiprocessing.cluster.wire"
local worker = require "multiprocessing.cluster.worker"

local type, tostring, tonumber, pairs, ipairs, error, setmetatable, pcall =
      type, tostring, tonumber, pairs, ipairs, error, setmetatable, pcall
local unpack = table.unpack
local monotonic = core.monotonic
local math_min, math_max, math_ceil = math.min, math.max, math.ceil

local M = {}
M.serve = worker.serve

local Pool, AsyncResult = {}, {}
Pool.__index, AsyncResult.__index = Pool, AsyncResult
Pool.__name = "multiprocessing.cluster.Pool"

local function perr(msg, level) error(errors.new("ProcessError", msg), level + 1) end

local KNOWN = { redis = true, queue = true, authkey = true, max_retries = true,
  lease = true, result_ttl = true, timeout = true, retry_for = true }

local function check_num(o, k, default, min, level)
  local v = o[k]
  if v == nil then return default end
  if type(v) ~= "number" or v < min then
    error(("bad argument #1 to 'Pool' (%s must be a number >= %s)"):format(k, min), level + 1)
  end
  return v
end

-- cluster.Pool{redis=, queue=, authkey=, max_retries=2, lease=10,
-- result_ttl=60, timeout=, retry_for=60} -> Pool
function M.Pool(o)
  if type(o) ~= "table" then error("bad argument #1 to 'Pool' (table expected)", 2) end
  for k in pairs(o) do
    if not KNOWN[k] then error("bad argument #1 to 'Pool' (unknown option '" .. tostring(k) .. "')", 2) end
  end
  for _, k in ipairs{ "redis", "queue", "authkey" } do
    if type(o[k]) ~= "string" then
      error("bad argument #1 to 'Pool' (" .. k .. " must be a string)", 2)
    end
  end
  local self = setmetatable({
    _keys = wire.keys(o.queue), _authkey = o.authkey,
    _max_retries = check_num(o, "max_retries", 2, 0, 2),
    _lease = math.floor(check_num(o, "lease", 10, 1, 2) * 1000),
    _ttl = math.floor(check_num(o, "result_ttl", 60, 1, 2) * 1000),
    _timeout = o.timeout and check_num(o, "timeout", nil, 0, 2),
    _client = wire.hex(auth.random_bytes(8)),
    _n = 0, _tasks = {}, _ntasks = 0, _last = "0-0", _reading = false,
    _state = "running", _done = 0, _failed = 0, _refused = 0, _total = 0,
    _owner = core.getpid(), _expire_at = 0,
  }, Pool)
  local copts = { retry_for = o.retry_for }
  self._wc = conn.new(o.redis, copts)
  self._rc = conn.new(o.redis, copts)
  self._rkey = self._keys.result(self._client)
  wire.check_key(self._wc, self._keys, o.authkey, 2)
  return self
end

function Pool:_own(level)
  if core.getpid() ~= self._owner then perr("cluster Pool used from another process", level + 1) end
  if self._state ~= "running" then perr("Pool is not running", level + 1) end
end

-- Queue one stream entry for the task (sent by _flush).
function Pool:_add(job, pos, count, task, cmds)
  self._n = self._n + 1
  local t = self._n
  task.c, task.t, task.lease = self._client, t, self._lease
  task.max_retries, task.ttl = self._max_retries, self._ttl
  local m = mp.dumps(task)
  self._tasks[t] = { job = job, pos = pos, count = count }
  self._ntasks = self._ntasks + 1
  cmds[#cmds + 1] = { "XADD", self._keys.tasks, "*", "c", self._client, "t", t,
                      "l", self._lease, "m", m, "s", wire.sign(self._authkey, m), t = t }
end

function Pool:_send(cmds)
  local replies = self._wc:pipeline(cmds)
  for i, r in ipairs(replies) do
    local task = self._tasks[cmds[i].t]
    if task then task.entry = r[1] end
    if r[1] == nil then error("XADD: " .. tostring(r[2]), 3) end
  end
end

local function new_job(self, mode, total, opts)
  local job = { pool = self, mode = mode, total = total, ndone = 0, results = {}, errs = {},
                order = {}, ohead = 1, opts = opts or {} }
  self._total = self._total + total
  if total == 0 then job.done = true; job.results.n = 0 end
  return job
end

-- Deliver one result message to its task.
function Pool:_deliver(msg)
  local task = self._tasks[msg.t]
  if not task then return end                -- a second run's result: dropped
  self._tasks[msg.t] = nil
  self._ntasks = self._ntasks - 1
  local job = task.job
  local err = msg.err and errors.from_data(msg.err)
  if err and msg.err.worker then err.worker = msg.err.worker end
  if job.mode == "apply" then
    if err then job.errs[1] = err else job.results[1] = msg.r end
  else
    for i = 0, task.count - 1 do
      local pos = task.pos + i
      if err then
        if i == 0 then job.errs[pos] = err end
      else
        local r = msg.r[i + 1]
        if job.mode == "map" then job.results[pos] = r[1] else job.results[pos] = r end
      end
      if not err or i == 0 then job.order[#job.order + 1] = pos end
    end
  end
  job.ndone = job.ndone + task.count
  self._done = self._done + task.count
  if err then
    self._failed = self._failed + task.count
    if not job.first_pos or task.pos < job.first_pos then job.first_pos, job.first_err = task.pos, err end
  end
  local p = job.opts.progress
  if type(p) == "function" then p(job.ndone, job.total) end
  if job.ndone >= job.total then
    job.done = true
    if job.mode == "map" then job.results.n = job.total end
    if job.first_err then
      if job.opts.error_callback then job.opts.error_callback(job.first_err) end
    elseif job.opts.callback then
      if job.mode == "apply" then job.opts.callback(unpack(job.results[1], 1, job.results[1].n))
      else job.opts.callback(job.results) end
    end
  end
end

-- Make progress: read results for up to timeout seconds (nil: 1 s slices).
function Pool:_step(timeout)
  local now = monotonic()
  if now >= self._expire_at and self._ntasks > 0 then
    self._wc:call("PEXPIRE", self._rkey, self._ttl)     -- a live client keeps its stream
    self._expire_at = now + self._ttl / 3000
  end
  if not self._reading then
    local block = math.floor(math_min(timeout or 1, 1) * 1000)
    if block < 1 then block = 1 end
    self._rc:send("XREAD", "COUNT", 1000, "BLOCK", block, "STREAMS", self._rkey, self._last)
    self._reading = true
  end
  local rep, why = self._rc:poll(math_min(timeout or 1.5, 1.5))
  if rep == nil and why == "timeout" then return end
  self._reading = false
  if type(rep) ~= "table" then return end
  local ids = { "XDEL", self._rkey }
  for _, entry in ipairs(rep[1][2]) do
    local id, f = entry[1], wire.fields(entry[2])
    self._last = id
    ids[#ids + 1] = id
    local t = math.tointeger(tonumber(f.t))
    if f.refused then
      if t and self._tasks[t] then
        self:_deliver{ t = t, err = { type = "AuthenticationError", message =
          "a worker refused the task (" .. f.refused .. "): its authkey is not this pool's" } }
      end
    else
      local msg = wire.decode(self._authkey, f.m, f.s)
      if type(msg) == "table" and msg.t == t then self:_deliver(msg)
      else self._refused = self._refused + 1 end
    end
  end
  if #ids > 2 then self._wc:call(unpack(ids)) end
end

function Pool:_until(pred, timeout)
  local deadline = timeout and monotonic() + timeout
  while not pred() do
    if self._state == "terminated" then return false end
    local left
    if deadline then
      left = deadline - monotonic()
      if left <= 0 then return false end
    end
    self:_step(left)
  end
  return true
end

-- ---- submitting --------------------------------------------------------

local function new_result(job) return setmetatable({ _job = job }, AsyncResult) end

-- pool:apply_async(fn, args [, {callback=, error_callback=, timeout=}]) -> AsyncResult
function Pool:apply_async(fn, args, opts)
  self:_own(2)
  local function bad(i, what)
    error(("bad argument #%d to 'apply_async' (%s expected)"):format(i, what), 3)
  end
  if type(fn) ~= "function" then bad(1, "function") end
  if args ~= nil and type(args) ~= "table" then bad(2, "table") end
  if opts ~= nil and type(opts) ~= "table" then bad(3, "table") end
  local job = new_job(self, "apply", 1, opts)
  local cmds = {}
  self:_add(job, 1, 1, { mode = "apply", fn = fn, args = args or {},
                         timeout = opts and opts.timeout or self._timeout }, cmds)
  self:_send(cmds)
  return new_result(job)
end
Pool.submit = Pool.apply_async

function Pool:apply(fn, args)
  return self:apply_async(fn, args):get()
end

function Pool:_map(mode, fn, xs, star, opts, level)
  self:_own(level + 1)
  if type(fn) ~= "function" then error("bad argument #1 (function expected)", level + 1) end
  if type(opts) == "number" then opts = { chunksize = opts } end
  if opts ~= nil and type(opts) ~= "table" then
    error("bad argument #3 (chunksize or table expected)", level + 1)
  end
  local list = xs
  if type(xs) == "function" then                -- an iterator is read now
    list = {}
    for v in xs do list[#list + 1] = v end
  elseif type(xs) ~= "table" then
    error("bad argument #2 (list or iterator expected)", level + 1)
  end
  local n = list.n or #list
  local job = new_job(self, mode, n, opts)
  local size = opts and opts.chunksize
  if not size then
    local _, workers = wire.alive(self._wc, self._keys)
    size = math_max(1, math_ceil(n / (4 * math_max(workers, 2))))
  end
  local cmds = {}
  for first = 1, n, size do
    local last = math_min(n, first + size - 1)
    self:_add(job, first, last - first + 1,
              { mode = "chunk", star = star, fn = fn, args = { unpack(list, first, last) } }, cmds)
    if #cmds >= 256 then self:_send(cmds); cmds = {} end
  end
  if #cmds > 0 then self:_send(cmds) end
  return job
end

function Pool:map_async(fn, xs, opts) return new_result(self:_map("map", fn, xs, false, opts, 2)) end
function Pool:map(fn, xs, opts) return new_result(self:_map("map", fn, xs, false, opts, 2)):get() end
function Pool:starmap_async(fn, xs, opts) return new_result(self:_map("map", fn, xs, true, opts, 2)) end
function Pool:starmap(fn, xs, opts) return new_result(self:_map("map", fn, xs, true, opts, 2)):get() end

-- pool:imap(fn, xs [, chunksize | opts]) -> iterator giving i, results... in order
function Pool:imap(fn, xs, opts)
  local job = self:_map("imap", fn, xs, false, opts, 2)
  local pos = 0
  return function()
    local want = pos + 1
    if want > job.total then return nil end
    self:_until(function()
      return job.results[want] ~= nil or job.errs[want] ~= nil or job.aborted ~= nil
        or (job.ndone >= job.total and job.first_err ~= nil)
    end)
    pos = want
    local r = job.results[want]
    if r then job.results[want] = nil; return want, unpack(r, 1, r.n) end
    error(job.errs[want] or job.aborted or job.first_err, 0)
  end
end

-- pool:imap_unordered(...) -> iterator giving i, results... as they come
function Pool:imap_unordered(fn, xs, opts)
  local job = self:_map("imap", fn, xs, false, opts, 2)
  return function()
    self:_until(function()
      return job.order[job.ohead] ~= nil or job.aborted ~= nil or job.done == true
    end)
    local pos = job.order[job.ohead]
    if not pos then
      if job.aborted then error(job.aborted, 0) end
      return nil
    end
    job.ohead = job.ohead + 1
    local r = job.results[pos]
    if r == nil then error(job.errs[pos], 0) end
    job.results[pos] = nil
    return pos, unpack(r, 1, r.n)
  end
end

-- ---- the rest of the Pool API -----------------------------------------

-- pool:poll([timeout]) -> number of unfinished tasks
function Pool:poll(timeout)
  if self._state ~= "terminated" then self:_step(timeout or 0) end
  return self._ntasks
end

function Pool:fileno() return self._rc:fileno() end

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

function Pool:close()
  if self._state == "running" then self._state = "closed" end
end

-- Remove what this client left in Redis: its result stream, and the
-- entries of its tasks that no worker finished.
function Pool:_cleanup()
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
-- taken off the queue
function Pool:terminate()
  if self._state == "terminated" or self._state == "joined" then return end
  self._state = "terminated"
  if core.getpid() ~= self._owner then return end
  local err = errors.new("ProcessError", "Pool was terminated before the task finished")
  for _, task in pairs(self._tasks) do
    local job = task.job
    if not job.done then job.aborted, job.first_err, job.done = err, job.first_err or err, true end
  end
  self:_cleanup()
  self._tasks, self._ntasks = {}, 0
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

-- ---- AsyncResult -------------------------------------------------------

function AsyncResult:ready()
  local job = self._job
  if not job.done and job.pool._state ~= "terminated" then job.pool:_step(0) end
  return job.done == true
end

function AsyncResult:wait(timeout)
  local job = self._job
  return job.pool:_until(function() return job.done == true end, timeout)
end

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
  if not job.done and not job.pool:_until(function() return job.done == true end, timeout) then
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

M.AsyncResult = AsyncResult
M.PoolClass = Pool
return M
