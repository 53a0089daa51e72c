-- multiprocessing.pool_jobs: a Pool's jobs: the queue of those with work
-- to hand out, how each is cut into ranges of items, and the ids of their
-- functions (docs/design.md, decision 6).
--
-- Methods of the Pool (pool.lua installs them); has_work and take_chunk
-- are pool_scheduler.lua's, which makes chunks of the ranges.
--
-- A job (pool.lua's _submit makes it) is a table with: mode ("apply",
-- "map", "imap", "imapu"), fnid/fnbytes (its function), star, chunksize,
-- list and total (a list input) or iter, items, consumed, window,
-- exhausted (an iterator input), cursor (next item to hand out), retry
-- (ranges handed out again), results, errs, ndone, nfail, first_err,
-- done, finished (the process-wide count of jobs finished when this one
-- did: mp.as_completed's order), cancelled, done_cbs (add_done_callback's
-- { fn, AsyncResult } pairs), and for imap_unordered order/ohead/otail
-- (the finished positions in order).
--
-- A list input is cut in order; an iterator input is read as it is cut,
-- at most job.window items ahead of its consumer (pool:_consumed); the
-- ranges of chunks a dead worker never started (retry) go first.

local errors = require "multiprocessing.errors"

local pairs, pcall = pairs, pcall
local math_min, math_max = math.min, math.max

local M = {}
local Pool = {}             -- the methods this module gives the Pool
M.methods = Pool

local MAXFN = 256           -- cached functions before the caches are cleared
-- An iterator input is read no further ahead of the consumer than this
-- many items (an abandoned imap over an endless iterator stops there).
local WINDOW_MIN = 256

-- has_work(job) -> true when job has items to hand out now
local function has_work(job)
  if job.retry[1] then return true end
  if job.list then return job.cursor <= job.total end
  return not job.exhausted and job.cursor - 1 - job.consumed < job.window
end
M.has_work = has_work

-- take_chunk(job, maxn) -> first, n: the next range of up to maxn items of
-- job, and of no more than its chunksize (a range handed out again is cut
-- as the list was); nil when none now
local function take_chunk(job, maxn)
  local want = math_min(job.chunksize, maxn)
  local r = job.retry
  local k = #r
  if k > 0 then
    local first, n = r[k][1], r[k][2]
    if n > want then
      r[k][1], r[k][2] = first + want, n - want
      return first, want
    end
    r[k] = nil
    return first, n
  end
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
M.take_chunk = take_chunk

-- pool:_fn_id(fnbytes [, fnfds]) -> the number workers know the function
-- by; the caches (ours, the workers') are cleared once MAXFN are known. A
-- function with handles (fnfds) gets a number of its own: the same bytes
-- may stand for other handles.
function Pool:_fn_id(fnbytes, fnfds)
  local fnid = not fnfds and self._fnids[fnbytes]
  if fnid then return fnid end
  if self._fncount >= MAXFN then
    self._fnids, self._fncount, self._ewma = {}, 0, {}
    for slot, w in pairs(self._workers) do
      self._pc:ctl(slot, "clear")
      w.sent = {}
    end
  end
  self._nfn = self._nfn + 1
  fnid = self._nfn
  if not fnfds then self._fnids[fnbytes] = fnid end
  self._fncount = self._fncount + 1
  return fnid
end

-- pool:_add_job(job): take job in and start handing it out
function Pool:_add_job(job)
  if job.iter then job.window = math_max(WINDOW_MIN, 4 * self._n * job.chunksize) end
  self._active = self._active + 1
  self._unfinished[job] = true
  self:_queue_job(job)
  if job.total == 0 then self:_check_done(job) end
  self:_dispatch()
  self._pc:flush()
end

-- The consumer of an imap took one more result: read further ahead.
function Pool:_consumed(job)
  if job.consumed then
    job.consumed = job.consumed + 1
    if has_work(job) and not job.queued and not job.done then self:_queue_job(job) end
  end
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

-- pool:_cancel(job) -> true when some of job's items had not been handed
-- to a worker: those fail with CancelledError and never run (the others
-- run to their end); false when all had been.
function Pool:_cancel(job)
  local ranges = job.retry
  if job.list and job.cursor <= job.total then
    ranges[#ranges + 1] = { job.cursor, job.total - job.cursor + 1 }
    job.cursor = job.total + 1
  end
  if not ranges[1] then return false end
  job.retry = {}
  job.cancelled = true
  local err = errors.new("CancelledError", "the task was cancelled before it started")
  for i = 1, #ranges do self:_fail_range(job, ranges[i][1], ranges[i][2], err) end
  return true
end

return M
