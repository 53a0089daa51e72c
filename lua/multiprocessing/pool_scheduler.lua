-- multiprocessing.pool_scheduler: a Pool's books, the chunks of its jobs
-- (pool_jobs.lua) in its workers' hands, and the loop that moves them
-- (docs/design.md, decisions 6, 7).
--
-- Methods of the Pool (pool.lua installs them). Work is cut into chunks,
-- each sent to one chosen worker over that worker's own channel
-- (csrc/pool.c). A chunk is one record,
--
--   { seq =, job =, first =, n = [, deadline =, timedout = true] }
--
-- (seq: the number the worker's shared page names it by; items
-- first..first+n-1 of job), held in its worker's FIFO (w.fifo[w.head ..
-- w.tail-1]) from its send until its result is read or its worker dies:
-- a worker answers its chunks in the order it got them. A chunk with a
-- deadline (apply_async's timeout) is also a key of pool._timed.
-- Several chunks of a list sent to one worker in one call (pc:tasks: a
-- map with chunksize 1 keeps up to 64 in flight) are one record of the
-- FIFO, a run:
--
--   { seq =, job =, first =, n =, size =, k =, done = }
--
-- chunks seq .. seq+k-1 of size items each (the last may be shorter),
-- items first..first+n-1, of which the first done have come back.
--
-- Pipelining: a worker holds one chunk until the function's time per item
-- is known; fast functions then get chunks worth about QUEUED_US of work
-- in flight per worker, 4 to 64 of them (so chunksize 1 is cheap), slow
-- ones 1 or 2 (so a long task never queues behind another while a worker
-- is free).
--
-- No threads (decision 7): the pool moves only in _step, which the
-- program's calls into it run (get, wait, map, the imap iterators, poll,
-- join); callbacks run at the end of a step.

local errors = require "multiprocessing.errors"
local core = require "multiprocessing.core"
local log = require "multiprocessing.log"
local results = require "multiprocessing.pool_results"
local jobs = require "multiprocessing.pool_jobs"

local type, pairs, tostring, pcall = type, pairs, tostring, pcall
local math_huge, math_max, math_tointeger = math.huge, math.max, math.tointeger
local monotonic = core.monotonic
local has_work, take_chunk = jobs.has_work, jobs.take_chunk

local Pool = {}             -- the methods this module gives the Pool

local FAST_US = 1000        -- a chunk this quick may be deeply pipelined
local MEDIUM_US = 100000
-- A fast function's worker holds chunks worth about this much work (4 to
-- 64 chunks): enough to stay busy while the parent reads results, and no
-- more, since every queued chunk is buffer memory that must be touched
-- (page faults measured as the larger part of a first big map's cost).
local QUEUED_US = 200
-- Jobs finished in this process, every pool counted (job.finished; the
-- cluster pool's too).
local nfinished = results.finished

-- A task's error, as a worker sent it (errors.to_data), raised in the
-- parent as a RemoteError (decision 9).
local function remote_error(data)
  if type(data) ~= "table" then
    return errors.new("RemoteError", tostring(data))
  end
  return errors.new("RemoteError", data.message,
                    { traceback = data.traceback, pid = data.pid,
                      remote_type = data.type })
end

-- ---- dispatch ------------------------------------------------------------

-- Chunks a worker may hold for job (1 until the function's speed is known).
function Pool:_depth(job)
  local per = self._ewma[job.fnid]
  if not per then return job.mode == "map" and 2 or 1 end
  local est = per * job.chunksize
  if est < FAST_US then                   -- QUEUED_US // est, 4 to 64
    if est * 64 <= QUEUED_US then return 64 end
    if est * 4 >= QUEUED_US then return 4 end
    return math_tointeger(QUEUED_US // est)   -- (est is a float: so is //)
  end
  if est < MEDIUM_US then return 2 end
  return 1
end

-- An item or result that could not be serialized: err as an error object.
local function serialization_error(err)
  if type(err) == "table" then return err end
  return errors.new("SerializationError", tostring(err))
end

-- Frame items first..last of job for slot's worker w as chunks of size
-- items (pc:tasks), its function first if w lacks it. -> chunks framed
-- whole, and the error that stopped the next one, if any.
local function frame(self, slot, w, job, seq, first, last, size)
  local pc = self._pc
  local fnid = job.fnid
  if not w.sent[fnid] then
    pc:def(slot, fnid, job.fnbytes, job.fnfds)
    w.sent[fnid] = true
  end
  local ok, k = pcall(pc.tasks, pc, slot, seq, fnid, job.star, job.list or job.items,
                      first, last, size)
  if ok then return k end
  return pc:framed(slot), serialization_error(k)
end

-- Send items first..first+n-1 of job to slot's worker w as one chunk.
function Pool:_send(slot, w, job, first, n)
  local seq = self._seq + 1
  self._seq = seq
  local _, err = frame(self, slot, w, job, seq, first, first + n - 1, n)
  if err then                          -- an item could not be serialized
    self:_fail_range(job, first, n, err)
    return
  end
  local chunk = { seq = seq, job = job, first = first, n = n }
  w.fifo[w.tail] = chunk
  w.tail = w.tail + 1
  w.inflight = w.inflight + 1
  w.items = w.items + n
  if job.timeout then
    chunk.deadline = monotonic() + job.timeout
    self._timed[chunk] = slot
    self._ntimed = self._ntimed + 1
    w.exclusive = chunk
    self:_arm()
  end
end

-- Send items first..last of job (a list) to slot's worker w as chunks of
-- size items, in one call; a run in w's FIFO.
function Pool:_send_run(slot, w, job, first, last, size)
  local seq = self._seq + 1
  local k, err = frame(self, slot, w, job, seq, first, last, size)
  local n = k * size
  if first + n - 1 > last then n = last - first + 1 end
  if k > 0 then
    w.fifo[w.tail] = { seq = seq, job = job, first = first, n = n, size = size, k = k, done = 0 }
    w.tail = w.tail + 1
    w.inflight = w.inflight + k
    w.items = w.items + n
  end
  self._seq = seq + k - 1
  if err then                          -- chunk k+1 fails, the rest goes again
    self._seq = seq + k
    local f = first + n
    local m = size
    if f + m - 1 > last then m = last - f + 1 end
    if f + m <= last then
      local r = job.retry
      r[#r + 1] = { f + m, last - f - m + 1 }
    end
    self:_fail_range(job, f, m, err)
  end
end

function Pool:_dispatch()
  if self._jobhead == self._jobtail then return end   -- no job queued
  if self._state == "terminated" or self._broken then return end
  local job = self:_head_job()
  if not job then return end
  local n, workers, maxtasks = self._n, self._workers, self._maxtasks
  local start = self._rr
  local djob, depth                       -- _depth(djob): no result comes meanwhile
  for i = 1, n do
    local slot = (start + i - 1) % n + 1
    local w = workers[slot]
    while w and not w.exclusive and not w.retiring do
      job = self._jobs[self._jobhead]   -- _head_job's answer, mostly
      if not (job and has_work(job)) then
        job = self:_head_job()
        if not job then self._rr = slot return end
      end
      local maxn = math_huge
      if maxtasks then
        maxn = maxtasks - w.items
        if maxn <= 0 then break end
      end
      local room = 1                  -- chunks to send now
      if job.timeout then
        if w.inflight > 0 then break end
        maxn = 1
      else
        if job ~= djob then djob, depth = job, self:_depth(job) end
        room = depth - w.inflight
        if room <= 0 then break end
      end
      local size = job.chunksize
      if room > 1 and job.list and not maxtasks and not job.retry[1]
         and job.total - job.cursor >= size then    -- a run: two chunks or more
        local first = job.cursor
        local last = first + room * size - 1    -- has_work: first <= total
        if last > job.total then last = job.total end
        job.cursor = last + 1
        self:_send_run(slot, w, job, first, last, size)
      else
        local first, cnt = take_chunk(job, maxn)
        if first then self:_send(slot, w, job, first, cnt)
        else self:_check_done(job) end
      end
    end
  end
  self._rr = start % n + 1
end

-- ---- results -------------------------------------------------------------

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

-- Items first..first+n-1 of job are done, failed with err.
function Pool:_fail_range(job, first, n, err)
  for i = first, first + n - 1 do self:_fail_item(job, i, err) end
  if job.items then
    for i = first, first + n - 1 do job.items[i] = nil end
  end
  job.ndone = job.ndone + n
  self._done = self._done + n
  self:_check_done(job)
end

function Pool:_check_done(job)
  if job.done then return end
  if job.total and job.ndone >= job.total and not has_work(job) then
    job.done = true
    local n = nfinished[1] + 1
    nfinished[1] = n
    job.finished = n
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
    if job.done_cbs then self:_done_callbacks(job) end
    if self._state == "closed" and self._active == 0 then self:_exit_workers() end
  end
end

-- The result frame of w's oldest chunk (n items, us microseconds of work).
function Pool:_result(slot, w, n, us)
  local h = w.head
  local chunk = w.fifo[h]
  local first
  local size = chunk.size
  if size then                            -- a run: its next chunk
    local d = chunk.done
    first = chunk.first + d * size
    d = d + 1
    chunk.done = d
    if d == chunk.k then
      w.fifo[h] = nil
      w.head = h + 1
    end
  else
    w.fifo[h] = nil
    w.head = h + 1
    first = chunk.first
    if w.exclusive == chunk then w.exclusive = nil end
    if self._timed[chunk] then
      self._timed[chunk] = nil
      self._ntimed = self._ntimed - 1
    end
  end
  w.inflight = w.inflight - 1
  local job = chunk.job
  if not job then return end              -- aborted
  local ok, nerr, errs = pcall(self._pc.take, self._pc, slot, job.results, first, job.packed)
  if not ok then
    local e = serialization_error(nerr)
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
    local kind, data, n, us = pc:next(slot)
    if not kind then return end
    if kind == "result" then self:_result(slot, w, n, us)
    elseif kind == "retire" then w.retiring = true
    elseif kind == "initfail" then
      local e = remote_error(data)
      e.message = "Pool initializer failed: " .. tostring(e.message)
      self:_break(e)
      return
    end
  end
end

-- The chunks dead worker w held (started, finished: the last chunks it
-- began and ended, from the shared page; code: its exit code). The one it
-- was running fails with WorkerLostError (TimeoutError if the parent
-- killed it for its deadline), those it finished without sending their
-- results fail too (no task runs twice), those it never started are
-- handed out again: lost_one does this for chunk seq (items
-- first..first+n-1 of job), _lost_chunks for every chunk w held.
local function lost_one(self, w, job, seq, first, n, timedout, code, started, finished)
  local err
  local who = { pid = w.pid, exitcode = code }
  if timedout then
    err = errors.new("TimeoutError", ("task timed out after %g s; its worker (pid %d) "
                     .. "was killed and replaced"):format(job.timeout, w.pid), who)
  elseif seq == started and seq > finished then
    err = errors.new("WorkerLostError", ("worker (pid %d) died with exit code %d "
                     .. "while running this task"):format(w.pid, code), who)
  elseif seq <= finished then          -- done, but its result was held back
    err = errors.new("WorkerLostError", ("worker (pid %d) died with exit code %d "
                     .. "before sending this task's result"):format(w.pid, code), who)
  end
  if err then
    self:_fail_range(job, first, n, err)
  else                                 -- never started: hand it out again
    local r = job.retry
    r[#r + 1] = { first, n }
    self:_queue_job(job)
  end
end

function Pool:_lost_chunks(w, code, started, finished)
  for i = w.head, w.tail - 1 do
    local chunk = w.fifo[i]
    local job = chunk.job
    if self._timed[chunk] then
      self._timed[chunk] = nil
      self._ntimed = self._ntimed - 1
    end
    local size = chunk.size
    if job and size then               -- a run: its chunks not come back
      local last = chunk.first + chunk.n - 1
      for j = chunk.done, chunk.k - 1 do
        local seq, f = chunk.seq + j, chunk.first + j * size
        if seq > started and seq > finished then   -- this one and the rest never
          local r = job.retry                       -- started: one range again
          r[#r + 1] = { f, last - f + 1 }
          self:_queue_job(job)
          break
        end
        local m = last - f + 1
        if m > size then m = size end
        lost_one(self, w, job, seq, f, m, false, code, started, finished)
      end
    elseif job then                    -- (nil: aborted)
      lost_one(self, w, job, chunk.seq, chunk.first, chunk.n, chunk.timedout,
               code, started, finished)
    end
  end
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
    local n = nfinished[1] + 1
    nfinished[1] = n
    job.finished = n
    self._unfinished[job] = nil
    if job.done_cbs then self:_done_callbacks(job) end
  end
  self._active = 0
  for _, w in pairs(self._workers) do     -- results still to come are dropped
    for i = w.head, w.tail - 1 do w.fifo[i].job = nil end
  end
  self._timed, self._ntimed = {}, 0
  self._jobs, self._jobhead, self._jobtail = {}, 1, 1
end

-- ---- deadlines -----------------------------------------------------------

-- Arm the pool's timer at the nearest deadline of a chunk not yet killed.
function Pool:_arm()
  local best
  for chunk in pairs(self._timed) do
    local d = chunk.deadline
    if not chunk.timedout and (not best or d < best) then best = d end
  end
  if best then self._pc:timer(math_max(best - monotonic(), 1e-6))
  else self._pc:timer(nil) end
end

-- Kill the worker of each chunk whose deadline passed (its death fails
-- the chunk with TimeoutError), then arm the timer again.
function Pool:_check_deadlines()
  local now = monotonic()
  for chunk, slot in pairs(self._timed) do
    if chunk.deadline <= now and not chunk.timedout then
      chunk.timedout = true
      local w = self._workers[slot]
      if w then
        if log.enabled("WARN") then
          log.warn("pool worker %d (pid %d) killed: a task ran past its timeout of %g s",
                   slot, w.pid, chunk.job.timeout or 0)
        end
        w.proc:kill()
      end
    end
  end
  self:_arm()
end

-- ---- the loop ------------------------------------------------------------

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
  local seq = self._seq
  self:_dispatch()
  -- what was handed out now goes now: the caller may not come back soon
  -- (an event loop waits for the pool's fd, which stays quiet until the
  -- workers have work), and the next wait's flush may be far
  if self._seq ~= seq then pc:flush() end
  if self._cbhead < self._cbtail then self:_run_callbacks() end
end


return { methods = Pool }
