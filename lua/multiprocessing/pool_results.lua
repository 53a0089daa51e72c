-- multiprocessing.pool_results: how a Pool's results reach the program:
-- AsyncResult, the imap and imap_unordered iterators, callbacks and
-- progress.
--
-- Each reads a job (see pool_scheduler.lua) and makes the pool progress
-- (pool:_step, pool:_until) while what it waits for is not there. The
-- callbacks and progress bars a step produced run at its end
-- (pool:_run_callbacks, installed in the Pool with pool:_later), never in
-- the middle of the books (docs/design.md, decision 7).

local core = require "multiprocessing.core"
local errors = require "multiprocessing.errors"
local check = require "multiprocessing.check"

local type, error, tostring, setmetatable = type, error, tostring, setmetatable
local unpack = table.unpack
local monotonic = core.monotonic
local stderr = io.stderr

local M = {}

-- ---- AsyncResult -----------------------------------------------------------

local AsyncResult = {}
AsyncResult.__index = AsyncResult
AsyncResult.__name = "multiprocessing.AsyncResult"
M.AsyncResult = AsyncResult

-- pool_results.new(job) -> the AsyncResult of job
function M.new(job)
  return setmetatable({ _job = job }, AsyncResult)
end

-- r:ready() -> boolean (makes progress first)
function AsyncResult:ready()
  local job = self._job
  if not job.done then job.pool:_step(0) end
  return job.done == true
end

-- r:wait([timeout]) -> true when ready, false on timeout
function AsyncResult:wait(timeout)
  check.timeout(timeout, 1, "wait")
  local job = self._job
  return job.pool:_until(function() return job.done == true end, timeout)
end

-- r:successful() -> boolean; raises a ProcessError when not ready
function AsyncResult:successful()
  if not self:ready() then errors.raise("ProcessError", "result is not ready", 2) end
  return self._job.first_err == nil
end

-- r:get([timeout]) -> the results | nil, "timeout"; raises the task's error
function AsyncResult:get(timeout)
  check.timeout(timeout, 1, "get")
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

-- ---- iterators ---------------------------------------------------------------

local function raise_item(job, pos)
  error(job.errs[pos] or job.aborted, 0)
end

-- The error of an iterator input, raised once after the items it gave.
local function raise_iter_error(job)
  local e = job.iter_error
  if e then
    job.iter_error = nil
    error(e, 0)
  end
end

-- pool_results.imap(pool, job) -> iterator giving i, results... in input order
function M.imap(pool, job)
  local pos = 0
  local results, errs = job.results, job.errs
  return function()
    local want = pos + 1
    pool:_until(function()
      return results[want] ~= nil or errs[want] ~= nil or job.aborted ~= nil
             or (job.total ~= nil and want > job.total and job.done == true)
    end)
    local r = results[want]
    if r ~= nil then
      pos = want
      results[want] = nil
      pool:_consumed(job)
      return want, unpack(r, 1, r.n)
    end
    if errs[want] ~= nil or job.aborted then
      pos = want
      pool:_consumed(job)
      raise_item(job, want)
    end
    raise_iter_error(job)
    return nil
  end
end

-- pool_results.imap_unordered(pool, job) -> iterator giving i, results...
-- as they finish
function M.imap_unordered(pool, job)
  local results = job.results
  return function()
    pool:_until(function()
      return job.order[job.ohead] ~= nil or job.aborted ~= nil or job.done == true
    end)
    local pos = job.order[job.ohead]
    if pos then
      job.order[job.ohead] = nil
      job.ohead = job.ohead + 1
      local r = results[pos]
      pool:_consumed(job)
      if r == nil then raise_item(job, pos) end
      results[pos] = nil
      return pos, unpack(r, 1, r.n)
    end
    if job.aborted then error(job.aborted, 0) end
    raise_iter_error(job)
    return nil
  end
end

-- ---- callbacks and progress ------------------------------------------------

local Pool = {}             -- the methods this module gives the Pool
M.methods = Pool

-- Queue a callback (f false: job arg's progress) for the end of the step.
function Pool:_later(f, arg)
  local t = self._cbtail                  -- not #: the head of the queue has holes
  self._cbq[t] = { f, arg }
  self._cbtail = t + 1
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

return M
