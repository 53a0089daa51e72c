-- multiprocessing.synchronize: Lock, RLock, Semaphore, BoundedSemaphore,
-- Condition, Event and Barrier.
--
-- The classes are C userdata (csrc/sync.c) living in shared memory; this
-- module validates constructor arguments and adds the composed methods
-- (with, wait_for, Barrier.wait and its fields) to the C classes. How
-- each kind is rebuilt from a handle is registered by csrc/sync.c.

local core = require "multiprocessing.core"
local check = require "multiprocessing.check"

local error, pcall, select, ipairs = error, pcall, select, ipairs
local pack, unpack = table.pack, table.unpack
local monotonic = core.monotonic
local callable, typename = check.callable, check.typename

local M = {}
local exports = {}
M.exports = exports

local LOCK_T, RLOCK_T = core.classes.Lock, core.classes.RLock
local COUNT_MAX = 0x7fffffff     -- csrc/sync.c's bound on counts and parties

-- M.is_lock(x) -> true if x is a Lock or RLock
function M.is_lock(x)
  local n = typename(x)
  return n == LOCK_T or n == RLOCK_T
end

-- mp.Lock() / mp.RLock()
function exports.Lock(...)
  check.nargs(select("#", ...), 0, "Lock")
  return core.sync_new("Lock")
end
function exports.RLock(...)
  check.nargs(select("#", ...), 0, "RLock")
  return core.sync_new("RLock")
end

-- mp.Semaphore([n=1]) / mp.BoundedSemaphore([n=1])
function exports.Semaphore(n)
  n = check.integer(n, 1, "Semaphore", "value", 0, COUNT_MAX) or 1
  return core.sync_new("Semaphore", n)
end
function exports.BoundedSemaphore(n)
  n = check.integer(n, 1, "BoundedSemaphore", "value", 0, COUNT_MAX) or 1
  return core.sync_new("BoundedSemaphore", n)
end

-- mp.Condition([lock]): lock defaults to a new RLock
function exports.Condition(lock)
  if lock == nil then lock = core.sync_new("RLock")
  elseif not M.is_lock(lock) then
    check.argerror(1, "Condition", "Lock or RLock expected, got " .. typename(lock))
  end
  return core.sync_new("Condition", 0, lock)
end

-- mp.Event()
function exports.Event(...)
  check.nargs(select("#", ...), 0, "Event")
  return core.sync_new("Event")
end

-- mp.Barrier(parties [, action [, timeout]])
function exports.Barrier(parties, action, timeout)
  if parties == nil then check.argerror(1, "Barrier", "number of parties expected") end
  parties = check.integer(parties, 1, "Barrier", "parties", 1, COUNT_MAX)
  check.type(action, "callable", 2, "Barrier", "action")
  check.timeout(timeout, 3, "Barrier")
  return core.sync_new("Barrier", parties, { action = action, timeout = timeout })
end

-- obj:with(fn, ...) -> fn's results, run holding obj; released even on error
local function with(self, fn, ...)
  if not callable(fn) then check.argerror(1, "with", "function expected, got " .. typename(fn)) end
  self:acquire()
  local r = pack(pcall(fn, ...))
  self:release()
  if not r[1] then error(r[2], 0) end
  return unpack(r, 2, r.n)
end

for _, kind in ipairs { "Lock", "RLock", "Semaphore", "BoundedSemaphore", "Condition" } do
  core[kind .. "_methods"].with = with
end
M.with = with               -- also the manager proxies' (any acquire/release)

local cond = core.Condition_methods

-- cond:wait_for(pred [, timeout]) -> the predicate's last value
local function wait_for(self, pred, timeout)
  if not callable(pred) then
    check.argerror(1, "wait_for", "function expected, got " .. typename(pred))
  end
  check.timeout(timeout, 2, "wait_for")
  local result = pred()
  local deadline = timeout and monotonic() + timeout
  while not result do
    local left
    if deadline then
      left = deadline - monotonic()
      if left <= 0 then break end
    end
    self:wait(left)
    result = pred()
  end
  return result
end
cond.wait_for = wait_for
M.wait_for = wait_for       -- also the manager proxies' (any wait)

local barrier = core.Barrier_methods

-- b:wait([timeout]) -> index in 1..parties | nil, "broken" | nil, "timeout"
function barrier.wait(self, timeout)
  local st = self:_state()
  if timeout == nil then timeout = st.timeout end
  local action = st.action
  local index, run = self:_wait(timeout, action ~= nil)
  if index and run then
    local ok, err = pcall(action)
    if not ok then
      self:abort()
      error(err, 0)
    end
    self:_pass()
  end
  if index then return index end
  return nil, run
end

-- b.parties, b.n_waiting, b.broken
local bfields = {
  parties = function(b) return (b:_fields()) end,
  n_waiting = function(b) local _, n = b:_fields() return n end,
  broken = function(b) local _, _, broken = b:_fields() return broken end,
}
core.Barrier_mt.__index = function(self, k)
  local m = barrier[k]
  if m ~= nil then return m end
  local f = bfields[k]
  if f then return f(self) end
  return nil
end

return M
