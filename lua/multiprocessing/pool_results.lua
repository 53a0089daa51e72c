-- multiprocessing.pool_results: how a Pool's results reach the program:
-- AsyncResult (with the futures' done, cancel and add_done_callback, and
-- the polling protocol of event loops), mp.as_completed, the imap and
-- imap_unordered iterators, callbacks and progress, and the map family's
-- calls (map_calls).
--
-- Two pools share them: the local Pool (pool.lua) and the cluster pool
-- (cluster.lua). Each reads a job and makes its pool progress while what
-- it waits for is not there, through this small protocol, which both
-- pools give:
--
--   job fields      pool, mode ("apply": results[1] is a packed call's
--                   results; else results is a list), results, first_err,
--                   done, finished (M.finished's number when it was
--                   done), cancelled, done_cbs; for the iterators errs,
--                   aborted, total, order/ohead (imap_unordered)
--   pool:_step(t)   one round: wait up to t seconds (nil: a while) for
--                   news, take it in, run the callbacks it made
--   pool:_until(pred [, t]) -> whether pred() held (steps until it does)
--   pool:_own(level)   raises unless this process owns the pool
--   pool:_cancel(job) -> whether some of job's tasks were cancelled
--   pool:_consumed(job)  an imap consumer took one more result
--   pool:_fd()      the fd that is readable when the pool has news
--   pool:timeout(), pool:fileno(), pool._state (a pool "terminated" or
--                   "joined" makes no more progress)
--
-- The callbacks and progress bars a step produced run at its end
-- (pool:_run_callbacks, installed in both pools with pool:_later and
-- pool:_done_callbacks: M.methods), never in the middle of the books
-- (docs/design.md, decision 7).

local core = require "multiprocessing.core"
local errors = require "multiprocessing.errors"
local check = require "multiprocessing.check"
local polling = require "multiprocessing.polling"

local type, error, tostring, setmetatable, getmetatable =
      type, error, tostring, setmetatable, getmetatable
local unpack, remove = table.unpack, table.remove
local monotonic, poll = core.monotonic, core.poll
local stderr = io.stderr

local M = {}

-- The jobs finished in this process, every pool counted: M.finished[1],
-- which a pool adds one to and copies into job.finished when a job is
-- done (mp.as_completed's order across pools).
M.finished = { 0 }

-- ---- AsyncResult -----------------------------------------------------------

local AsyncResult = {}
AsyncResult.__index = AsyncResult
AsyncResult.__name = "multiprocessing.AsyncResult"
M.AsyncResult = AsyncResult

-- results.check_star_items(list, n, fname, level): starmap's items must
-- each be a table of arguments (both pools check at the caller's line)
function M.check_star_items(list, n, fname, level)
  for i = 1, n do
    if type(list[i]) ~= "table" then
      check.argerror(2, fname, "item " .. i .. " is not a table of arguments", level + 1)
    end
  end
end

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
    local stepped = false                 -- get(0) takes in what came
    repeat
      local st = pool._state
      if st == "terminated" or st == "joined" then break end
      local left
      if deadline then
        left = deadline - monotonic()
        if left <= 0 then
          if stepped then break end
          left = 0
        end
      end
      pool:_step(left)
      stepped = true
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
  local job = self._job
  return ("<AsyncResult(%s)>"):format(not job.done and "pending"
                                      or job.cancelled and "cancelled" or "ready")
end

-- ---- futures (as concurrent.futures.Future) ---------------------------------

-- r:done() -> boolean: finished, failed or cancelled (makes progress first,
-- as ready does)
AsyncResult.done = AsyncResult.ready

-- r:cancel() -> true when the task had not been handed to a worker: it is
-- removed and never runs, and get raises CancelledError; false when it was
-- (running, queued in its worker's channel, or finished). For the map
-- family: the chunks not yet handed out are cancelled (their items fail
-- with CancelledError), the others run to their end; true when there were
-- any.
function AsyncResult:cancel()
  local job = self._job
  job.pool:_own(2)
  if job.done then return false end
  return job.pool:_cancel(job)
end

-- r:add_done_callback(fn): fn(r) once r is done, from the pool's calls in
-- the process that owns the pool (as callback is); at once if it is done
-- already. An error fn raises comes out of the call that ran it.
function AsyncResult:add_done_callback(fn)
  if type(fn) ~= "function" then
    check.argerror(1, "add_done_callback", "function expected, got " .. check.typename(fn))
  end
  local job = self._job
  if job.done then
    fn(self)
    return
  end
  local cbs = job.done_cbs
  if not cbs then cbs = {}; job.done_cbs = cbs end
  cbs[#cbs + 1] = { fn, self }
end

-- ---- the polling protocol (docs/eventloops.md) ------------------------------
--
-- An AsyncResult waits on its pool's fd: readable means "try now" (the
-- news may be another job's); r:ready() or r:get(0) then takes it in
-- without blocking. timeout() is 0 once the result is ready, so a poll
-- returns at once.

-- r:pollfd() -> its pool's fd (nil once the pool was terminated or joined:
-- the result is ready then, and timeout() is 0)
function AsyncResult:pollfd()
  local pool = self._job.pool
  local st = pool._state
  if st == "terminated" or st == "joined" then return nil end
  return polling.remember(pool, pool:_fd())
end

AsyncResult.events = polling.events

-- r:timeout() -> 0 when ready, else the pool's (nil, or when it must be
-- stepped although its fd stays quiet)
function AsyncResult:timeout()
  local job = self._job
  if job.done then return 0 end
  return job.pool:timeout()
end

-- r:fileno() -> its pool's fd (for luv's uv.new_poll); raises once the
-- pool was terminated or joined, as pool:fileno() does
function AsyncResult:fileno()
  return (self._job.pool:fileno())
end

-- r:_ready([seen]) -> ready? for mp.wait: as ready, but a pool in seen
-- (those mp.wait stepped this round) is not stepped again, so a wait on
-- many results of one pool makes one step per round, not one per result
function AsyncResult:_ready(seen)
  local job = self._job
  if not job.done then
    local pool = job.pool
    if not (seen and seen[pool]) then
      pool:_step(0)
      if seen then seen[pool] = true end
    end
  end
  return job.done == true
end

-- ---- as_completed ------------------------------------------------------------

-- Wait up to left seconds (nil: no bound) for news in the pools of the
-- pending results, and take it in.
local function step_pools(pending, n, left)
  local first, several = pending[1]._job.pool, false
  for i = 2, n do
    if pending[i]._job.pool ~= first then several = true break end
  end
  if not several then return first:_step(left) end
  local pools, fds, seen = {}, {}, {}
  for i = 1, n do
    local pool = pending[i]._job.pool
    if not seen[pool] then
      seen[pool] = true
      local st = pool._state
      if st ~= "terminated" and st ~= "joined" then
        pools[#pools + 1] = pool
        fds[#fds + 1] = pool:_fd()
        local t = pool:timeout()
        if t and (not left or t < left) then left = t end
      end
    end
  end
  poll(fds, left)
  for i = 1, #pools do pools[i]:_step(0) end
end

-- mp.as_completed(results [, timeout]) -> iterator giving each of the
-- AsyncResults (of any pools) as it finishes, with its position in
-- results: for r, i in mp.as_completed(rs) do ... end. Those finished
-- already come first, in the order they finished; a result given twice
-- comes once. timeout bounds the whole loop from this call: when it runs
-- out with results left, the iterator raises TimeoutError (as Python's).
function M.as_completed(results, timeout)
  if type(results) ~= "table" then
    check.argerror(1, "as_completed", "table expected, got " .. check.typename(results))
  end
  check.timeout(timeout, 2, "as_completed")
  local pending, where, n = {}, {}, 0
  for i = 1, results.n or #results do
    local r = results[i]
    if getmetatable(r) ~= AsyncResult then
      check.argerror(1, "as_completed", "results[" .. i .. "] is not an AsyncResult: "
                     .. check.typename(r))
    end
    if not where[r] then
      n = n + 1
      pending[n], where[r] = r, i
    end
  end
  local total = n
  local deadline = timeout and monotonic() + timeout
  return function()
    if n == 0 then return nil end
    local stepped = false
    while true do
      local best, bi
      for i = 1, n do
        local job = pending[i]._job
        if job.done and (not best or job.finished < best) then best, bi = job.finished, i end
      end
      if bi then
        local r = remove(pending, bi)
        n = n - 1
        return r, where[r]
      end
      local left
      if deadline then
        left = deadline - monotonic()
        if left <= 0 then
          if stepped then
            errors.raise("TimeoutError", ("%d (of %d) results unfinished after %g s")
                         :format(n, total, timeout), 2)
          end
          left = 0
        end
      end
      step_pools(pending, n, left)
      stepped = true
    end
  end
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

-- pool_results.map_calls(Pool, make, imapu): the map family, the same in
-- both pools, each call a job made by
-- pool[make](pool, fname, mode, fn, xs, star, opts) (imapu: the mode of
-- imap_unordered's job):
--   pool:map_async(fn, list [, chunksize | opts]) -> AsyncResult (of a list)
--   pool:map(fn, list [, chunksize | opts]) -> list of first results (with .n)
--   pool:starmap_async(fn, list of argument tables [, chunksize | opts]) -> AsyncResult
--   pool:starmap(fn, list of argument tables [, chunksize | opts]) -> list
--   pool:imap(fn, list_or_iterator [, chunksize | opts]) -> iterator giving
--     i, results... in input order
--   pool:imap_unordered(...) -> iterator giving i, results... as they finish
-- (no call is a tail call of make: its errors name the caller's line)
function M.map_calls(Pool, make, imapu)
  local new, imap, imap_unordered = M.new, M.imap, M.imap_unordered
  for name, star in pairs { map = false, starmap = true } do
    local async = name .. "_async"
    Pool[async] = function(self, fn, xs, opts)
      return new(self[make](self, async, "map", fn, xs, star, opts))
    end
    Pool[name] = function(self, fn, xs, opts)
      return new(self[make](self, name, "map", fn, xs, star, opts)):get()
    end
  end
  function Pool.imap(self, fn, xs, opts)
    return imap(self, self[make](self, "imap", "imap", fn, xs, false, opts))
  end
  function Pool.imap_unordered(self, fn, xs, opts)
    return imap_unordered(self, self[make](self, "imap_unordered", imapu, fn, xs, false, opts))
  end
end

-- ---- callbacks and progress ------------------------------------------------

local Pool = {}             -- the methods this module gives the Pool
M.methods = Pool

-- pool:_until(pred [, timeout]): run steps until pred() or the deadline;
-- true when pred() held (the cluster pool takes it too).
-- (A timeout of 0, or one that runs out, still makes one step: news that
-- came is taken in before the answer is no.)
function Pool:_until(pred, timeout)
  local deadline = timeout and monotonic() + timeout
  local stepped = false
  while not pred() do
    if self._state == "terminated" or self._state == "joined" then return pred() end
    local left
    if deadline then
      left = deadline - monotonic()
      if left <= 0 then
        if stepped then return false end
        left = 0
      end
    end
    self:_step(left)
    stepped = true
  end
  return true
end

-- Queue a callback (f false: job arg's progress) for the end of the step.
function Pool:_later(f, arg)
  local t = self._cbtail                  -- not #: the head of the queue has holes
  self._cbq[t] = { f, arg }
  self._cbtail = t + 1
end

-- Queue job's done callbacks (add_done_callback) for the end of the step.
function Pool:_done_callbacks(job)
  local cbs = job.done_cbs
  job.done_cbs = nil
  for i = 1, #cbs do self:_later(cbs[i][1], cbs[i][2]) end
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

-- pool:_run_all_callbacks(): run every queued callback, those after one
-- that raises too (terminate); the first error is raised after them
function Pool:_run_all_callbacks()
  local first
  while self._cbhead < self._cbtail do
    local ok, err = pcall(self._run_callbacks, self)
    if not ok and first == nil then first = err end
  end
  if first ~= nil then error(first, 0) end
end

return M
