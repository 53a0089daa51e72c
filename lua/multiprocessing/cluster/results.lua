-- multiprocessing.cluster.results: the client's results side of a
-- cluster Pool (cluster.lua): reading its result stream, delivering each
-- task's results or error to its job once, finishing jobs, and cancelling
-- tasks no worker has read yet. install(Pool) adds the methods.

local core = require "multiprocessing.core"
local errors = require "multiprocessing.errors"
local polling = require "multiprocessing.polling"
local results = require "multiprocessing.pool_results"
local wire = require "multiprocessing.cluster.wire"

local type, tostring, tonumber, pairs, ipairs =
      type, tostring, tonumber, pairs, ipairs
local unpack = table.unpack
local monotonic = core.monotonic
local math_min = math.min
local nfinished = results.finished

local M = {}
local Pool = {}

-- The standing read of the result stream: an XREAD always waits in Redis
-- (sent again at the end of each step), so that the result connection's
-- socket is readable when a result comes, and at least this often (the
-- read's empty answer), for an event loop that waits on it.
local BLOCK_MS = 1000

-- job is done: number it (as_completed's order) and queue its callbacks
-- for the end of the step (none but the done callbacks when aborted).
function Pool:_finish(job)
  job.done = true
  if not job.dropped then self._active = self._active - 1 end
  local n = nfinished[1] + 1
  nfinished[1] = n
  job.finished = n
  if job.mode == "map" then job.results.n = job.total end
  if not job.aborted then
    if job.first_err then
      if job.error_callback then self:_later(job.error_callback, job.first_err) end
    elseif job.callback then
      self:_later(job.callback, job)
    end
  end
  if job.done_cbs then self:_done_callbacks(job) end
end

-- Deliver task t's results (r: a packed call's, or a list of them for a
-- chunk) or its error (which fails each of its positions).
function Pool:_deliver(t, r, err)
  local task = self._tasks[t]
  if not task then return end                -- a second run's result: dropped
  self._tasks[t] = nil
  self._ntasks = self._ntasks - 1
  local job = task.job
  local first, count = task.pos, task.count
  if job.mode == "apply" then
    if err then job.errs[1] = err else job.results[1] = r end
  else
    local res, errs, map = job.results, job.errs, job.mode == "map"
    for i = 0, count - 1 do
      local pos = first + i
      if err then errs[pos] = err
      elseif map then res[pos] = r[i + 1][1]
      else res[pos] = r[i + 1] end
    end
  end
  local order, o = job.order, job.otail
  for pos = first, first + count - 1 do order[o] = pos; o = o + 1 end
  job.otail = o
  job.ndone = job.ndone + count
  self._done = self._done + count
  if err then
    self._failed = self._failed + count
    if not job.first_err or first < job.first_err_pos then
      job.first_err, job.first_err_pos = err, first
    end
  end
  if job.progress and not job.progress_dirty then
    job.progress_dirty = true
    self:_later(false, job)
  end
  if job.ndone >= job.total then self:_finish(job) end
end

-- Send the standing read of the result stream (see BLOCK_MS).
function Pool:_arm()
  self._rc:send("XREAD", "COUNT", 1000, "BLOCK", BLOCK_MS, "STREAMS", self._rkey, self._last)
  self._reading = true
end

-- Read the result stream for up to timeout seconds (nil: a while) and
-- deliver what came.
function Pool:_read(timeout)
  local now = monotonic()
  if now >= self._expire_at and self._ntasks > 0 then
    self._wc:call("PEXPIRE", self._rkey, self._ttl)     -- a live client keeps its stream
    self._expire_at = now + self._ttl / 3000
  end
  if not self._reading then self:_arm() end
  local rep, why = self._rc:poll(math_min(timeout or 1.5, 1.5))
  if rep == nil and why == "timeout" then return end
  self._reading = false
  if why == "reset" then polling.forget(self) end   -- (its fd is gone)
  if type(rep) ~= "table" then return end
  local ids = { "XDEL", self._rkey }
  for _, entry in ipairs(rep[1][2]) do
    local id, f = entry[1], wire.fields(entry[2])
    self._last = id
    ids[#ids + 1] = id
    local t = math.tointeger(tonumber(f.t))
    if f.refused then
      if t and self._tasks[t] then
        -- only a bad signature says the keys differ; the worker may also
        -- have failed to decode a task it could verify
        local e
        if f.refused == "bad signature" then
          e = errors.new("AuthenticationError", "a worker refused the task ("
            .. f.refused .. "): its authkey is not this pool's")
        else
          e = errors.new("ProcessError", "a worker refused the task: " .. tostring(f.refused))
        end
        self:_deliver(t, nil, e)
      end
    else
      local msg, bad = wire.decode(self._authkey, f.m, f.s)
      if type(msg) == "table" and msg.t == t then
        local err = msg.err
        if err then
          local e = errors.from_data(err)
          if err.worker then e.worker = err.worker end
          err = e
        end
        self:_deliver(t, msg.r, err)
      elseif msg == nil and bad ~= "bad signature" and t and self._tasks[t] then
        -- signed with our key, so it is our task's result: fail the task
        -- rather than drop it (a get() without timeout would wait forever)
        self:_deliver(t, nil, errors.new("SerializationError",
          "task result could not be decoded: " .. tostring(bad)))
      else
        self._refused = self._refused + 1
      end
    end
  end
  if #ids > 2 then self._wc:call(unpack(ids)) end
end

-- One round (pool_results.lua's protocol): read results for up to timeout
-- seconds (nil: a while), leave the next read waiting in Redis, then run
-- the callbacks the results made.
function Pool:_step(timeout)
  local st = self._state
  if st == "terminated" or st == "joined" then return end
  self:_read(timeout)
  if not self._reading then self:_arm() end
  if self._cbhead < self._cbtail then self:_run_callbacks() end
end

function Pool:_consumed() end            -- (a map's items are all sent at once)

-- Deletes, in one step, the entries of ARGV[2..] that were not yet
-- delivered to the group ARGV[1] (ids after its last-delivered-id);
-- returns the ids deleted.
local CANCEL = [[
local last = {0, 0}
local function id(s)
  local ms, seq = string.match(s, '^(%d+)-(%d+)$')
  return {tonumber(ms), tonumber(seq)}
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local name, at
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1] end
      if g[i] == 'last-delivered-id' then at = g[i + 1] end
    end
    if name == ARGV[1] and at then last = id(at) end
  end
end
local out = {}
for i = 2, #ARGV do
  local e = id(ARGV[i])
  if (e[1] > last[1] or (e[1] == last[1] and e[2] > last[2]))
     and redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then
    out[#out + 1] = ARGV[i]
  end
end
return out
]]

-- pool:_cancel(job) -> true when some of job's tasks were still in the
-- stream, not delivered to any worker: they are deleted (atomically: no
-- worker can read them meanwhile) and fail with CancelledError; false
-- when every task had been delivered.
function Pool:_cancel(job)
  local args, by = { "EVAL", CANCEL, 1, self._keys.tasks, wire.GROUP }, {}
  for t, task in pairs(self._tasks) do
    if task.job == job and task.entry then
      args[#args + 1] = task.entry
      by[task.entry] = t
    end
  end
  if #args == 5 then return false end
  local gone, msg = self._wc:call(unpack(args))
  if type(gone) ~= "table" then
    errors.raise("ProcessError", "cancel: cannot take the tasks off " .. self._keys.tasks
                 .. ": " .. tostring(msg), 3)
  end
  if #gone == 0 then return false end
  job.cancelled = true
  local err = errors.new("CancelledError", "the task was cancelled before it started")
  for _, entry in ipairs(gone) do self:_deliver(by[entry], nil, err) end
  return true
end

function M.install(P)
  for k, f in pairs(Pool) do P[k] = f end
end

return M
