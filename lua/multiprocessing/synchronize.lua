-- multiprocessing.synchronize: Lock, RLock, Semaphore, BoundedSemaphore,
-- Condition, Event and Barrier.
--
-- The classes are C userdata (csrc/sync.c) living in shared memory; this
-- module validates constructor arguments and adds the composed methods
-- (with, wait_for, Barrier.wait and its fields) to the C classes, and
-- registers how each kind is rebuilt from a handle (codec).

local core = require "multiprocessing.core"

local type, error, tostring, pcall, select, getmetatable, ipairs =
      type, error, tostring, pcall, select, getmetatable, ipairs
local math_type, tointeger = math.type, math.tointeger
local pack, unpack = table.pack, table.unpack
local monotonic = core.monotonic

local M = {}
local exports = {}
M.exports = exports

-- level counts from the function that calls argerror
local function argerror(n, fname, msg, level)
  error("bad argument #" .. n .. " to '" .. fname .. "' (" .. msg .. ")", (level or 2) + 1)
end

local function check_count(v, n, fname, default, min)
  if v == nil then return default end
  if math_type(v) ~= "integer" then
    if type(v) == "number" and v == v and v % 1 == 0 then
      v = tointeger(v)
    else
      argerror(n, fname, "integer expected, got " ..
               (type(v) == "number" and tostring(v) or type(v)), 3)
    end
  end
  if v < min or v > 0x7fffffff then
    argerror(n, fname, "must be in " .. min .. "..2147483647, got " .. v, 3)
  end
  return v
end

local function callable(f)
  if type(f) == "function" then return true end
  local mt = getmetatable(f)
  return type(mt) == "table" and mt.__call ~= nil
end

local function classname(o)
  local mt = getmetatable(o)
  return type(mt) == "table" and mt.__name or nil
end

-- M.is_lock(x) -> true if x is a Lock or RLock
function M.is_lock(x)
  local n = classname(x)
  return n == "multiprocessing.Lock" or n == "multiprocessing.RLock"
end

-- mp.Lock() / mp.RLock()
function exports.Lock(...)
  if select("#", ...) > 0 then argerror(1, "Lock", "no arguments expected") end
  return core.sync_new("Lock")
end
function exports.RLock(...)
  if select("#", ...) > 0 then argerror(1, "RLock", "no arguments expected") end
  return core.sync_new("RLock")
end

-- mp.Semaphore([n=1]) / mp.BoundedSemaphore([n=1])
function exports.Semaphore(n)
  return core.sync_new("Semaphore", check_count(n, 1, "Semaphore", 1, 0))
end
function exports.BoundedSemaphore(n)
  return core.sync_new("BoundedSemaphore", check_count(n, 1, "BoundedSemaphore", 1, 0))
end

-- mp.Condition([lock]): lock defaults to a new RLock
function exports.Condition(lock)
  if lock == nil then lock = core.sync_new("RLock")
  elseif not M.is_lock(lock) then
    argerror(1, "Condition", "Lock or RLock expected, got " ..
             (classname(lock) or type(lock)))
  end
  return core.sync_new("Condition", 0, lock)
end

-- mp.Event()
function exports.Event(...)
  if select("#", ...) > 0 then argerror(1, "Event", "no arguments expected") end
  return core.sync_new("Event")
end

-- mp.Barrier(parties [, action [, timeout]])
function exports.Barrier(parties, action, timeout)
  parties = check_count(parties, 1, "Barrier", nil, 1)
  if parties == nil then argerror(1, "Barrier", "number of parties expected") end
  if action ~= nil and not callable(action) then
    argerror(2, "Barrier", "function expected, got " .. type(action))
  end
  if timeout ~= nil and (type(timeout) ~= "number" or not (timeout >= 0)) then
    argerror(3, "Barrier", "timeout must be a number >= 0")
  end
  return core.sync_new("Barrier", parties, { action = action, timeout = timeout })
end

-- obj:with(fn, ...) -> fn's results, run holding obj; released even on error
local function with(self, fn, ...)
  if not callable(fn) then
    error("bad argument #1 to 'with' (function expected, got " .. type(fn) .. ")", 2)
  end
  self:acquire()
  local r = pack(pcall(fn, ...))
  self:release()
  if not r[1] then error(r[2], 0) end
  return unpack(r, 2, r.n)
end

for _, kind in ipairs { "Lock", "RLock", "Semaphore", "BoundedSemaphore", "Condition" } do
  core[kind .. "_methods"].with = with
end

local cond = core.Condition_methods

-- cond:wait_for(pred [, timeout]) -> the predicate's last value
function cond.wait_for(self, pred, timeout)
  if not callable(pred) then
    error("bad argument #1 to 'wait_for' (function expected, got " .. type(pred) .. ")", 2)
  end
  if timeout ~= nil and (type(timeout) ~= "number" or not (timeout >= 0)) then
    error("bad argument #2 to 'wait_for' (timeout must be a number >= 0)", 2)
  end
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

-- Handles: rebuild each kind on a received fd (spawn, sockets).
if core.register_handle then
  for _, kind in ipairs { "Lock", "RLock", "Semaphore", "BoundedSemaphore",
                          "Event", "Condition", "Barrier" } do
    core.register_handle(kind, function(state, fd)
      return core.sync_from_fd(kind, fd, state or nil)
    end)
  end
end

return M
