-- multiprocessing.managers.objects: the shared objects as the manager's
-- server holds them (docs/managers.md).
--
-- Each kind is a table of methods called by the server loop as
-- method(srv, obj, w, ...args) where w is the request ({conn=, seq=}).
-- A method returns its results, which the server sends back at once, or
-- srv:park(w, ...) (returns PARK) for a call that must wait: the reply is
-- sent later by srv:grant(w, ...), when the object can grant it, or by the
-- waiter's on_timeout when its deadline passes. Waiter lists are plain
-- arrays with lazy removal: a waiter that was answered, or whose
-- connection dropped, has w.done set and is skipped.
--
-- Locks and semaphores remember which connection holds them (srv:hold),
-- so that the server can release them when that connection drops
-- (release_dropped below); the next acquire then says "abandoned".

local type, error, pairs, ipairs, tostring, next, getmetatable, rawget =
      type, error, pairs, ipairs, tostring, next, getmetatable, rawget
local mathtype, floor, tointeger = math.type, math.floor, math.tointeger
local remove, insert, sort = table.remove, table.insert, table.sort

local M = {}
local kinds = {}
M.kinds = kinds

local function check_timeout(t)
  if t ~= nil and (type(t) ~= "number" or not (t >= 0)) then
    error("timeout must be a number >= 0 (got " .. tostring(t) .. ")", 0)
  end
  return t
end
M.check_timeout = check_timeout

-- the first waiter of list not done (removing the done ones before it)
local function first_live(list)
  while list[1] and list[1].done do remove(list, 1) end
  return list[1]
end

-- ---- dict, Namespace -------------------------------------------------------

local function count(t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n
end

local dict = {}
kinds.dict = dict

function M.new_dict(t)
  if t ~= nil and type(t) ~= "table" then error("dict: table expected, got " .. type(t), 0) end
  local copy = {}
  if t then for k, v in pairs(t) do copy[k] = v end end
  return { kind = "dict", t = copy }
end

function dict.getitem(_, o, _, k) return o.t[k] end
function dict.setitem(_, o, _, k, v)
  if k == nil then error("dict key is nil", 0) end
  if k ~= k then error("dict key is NaN", 0) end
  o.t[k] = v
end
function dict.len(_, o) return count(o.t) end
function dict.get(_, o, _, k, default)
  local v = o.t[k]
  if v == nil then return default end
  return v
end
function dict.keys(_, o)
  local r = {}
  for k in pairs(o.t) do r[#r + 1] = k end
  return r
end
function dict.values(_, o)
  local r = {}
  for _, v in pairs(o.t) do r[#r + 1] = v end
  return r
end
function dict.items(_, o)
  local r = {}
  for k, v in pairs(o.t) do r[#r + 1] = { k, v } end
  return r
end
function dict.update(_, o, _, t)
  if type(t) ~= "table" then error("update: table expected, got " .. type(t), 0) end
  for k, v in pairs(t) do o.t[k] = v end
end
function dict.pop(_, o, _, k, default)
  local v = o.t[k]
  if v == nil then return default end
  o.t[k] = nil
  return v
end
function dict.setdefault(_, o, _, k, v)
  if k == nil then error("dict key is nil", 0) end
  local old = o.t[k]
  if old ~= nil then return old end
  o.t[k] = v
  return v
end
function dict.clear(_, o) o.t = {} end
function dict.copy(_, o)
  local r = {}
  for k, v in pairs(o.t) do r[k] = v end
  return r
end
function dict.incr(_, o, _, k, n)
  if k == nil then error("dict key is nil", 0) end
  if n == nil then n = 1 end
  if type(n) ~= "number" then error("incr: the step must be a number (got " .. type(n) .. ")", 0) end
  local v = o.t[k]
  if v == nil then v = 0 end
  if type(v) ~= "number" then
    error("incr: the value at " .. tostring(k) .. " is a " .. type(v) .. ", not a number", 0)
  end
  v = v + n
  o.t[k] = v
  return v
end
function dict.apply(_, o, _, k, fn, ...)
  if k == nil then error("dict key is nil", 0) end
  if type(fn) ~= "function" then error("apply: function expected, got " .. type(fn), 0) end
  local v = fn(o.t[k], ...)
  o.t[k] = v
  return v
end

local namespace = {}
kinds.Namespace = namespace

local function check_name(k)
  if type(k) ~= "string" or k:sub(1, 1) == "_" then
    error("Namespace: a field name must be a string not starting with '_' (got "
          .. tostring(k) .. ")", 0)
  end
end

function M.new_namespace(t)
  local o = { kind = "Namespace", t = {} }
  if t ~= nil then
    if type(t) ~= "table" then error("Namespace: table expected, got " .. type(t), 0) end
    for k, v in pairs(t) do check_name(k); o.t[k] = v end
  end
  return o
end
namespace.getitem = dict.getitem
function namespace.setitem(_, o, _, k, v) check_name(k); o.t[k] = v end
namespace.copy = dict.copy
namespace.items = dict.items

-- ---- list -----------------------------------------------------------------

local list = {}
kinds.list = list

function M.new_list(t)
  if t ~= nil and type(t) ~= "table" then error("list: table expected, got " .. type(t), 0) end
  local copy = {}
  if t then for i = 1, #t do copy[i] = t[i] end end
  return { kind = "list", t = copy }
end

-- an index in 1..n (negative counts from the end), or nil
local function index(o, i, extra)
  if mathtype(i) ~= "integer" then
    error("list index must be an integer (got " .. tostring(i) .. ")", 0)
  end
  local n = #o.t
  if i < 0 then i = n + 1 + i end
  if i < 1 or i > n + (extra or 0) then return nil end
  return i
end

local function must(o, i, extra)
  local j = index(o, i, extra)
  if not j then error("list index " .. tostring(i) .. " out of range (length " .. #o.t .. ")", 0) end
  return j
end

local function notnil(v, what)
  if v == nil then error(what .. ": a list item cannot be nil", 0) end
end

function list.getitem(_, o, _, i)
  local j = index(o, i)
  return j and o.t[j]
end
function list.setitem(_, o, _, i, v)
  notnil(v, "l[i] = v")
  o.t[must(o, i, 1)] = v
end
function list.len(_, o) return #o.t end
function list.append(_, o, _, v) notnil(v, "append"); o.t[#o.t + 1] = v end
function list.extend(_, o, _, t)
  if type(t) ~= "table" then error("extend: table expected, got " .. type(t), 0) end
  local n = #o.t
  for i = 1, #t do o.t[n + i] = t[i] end
end
function list.insert(_, o, _, i, v)
  notnil(v, "insert")
  insert(o.t, must(o, i, 1), v)
end
function list.pop(_, o, _, i)
  if #o.t == 0 and i == nil then return nil end
  return remove(o.t, i == nil and #o.t or must(o, i))
end
function list.remove(_, o, _, v)
  for i = 1, #o.t do
    if o.t[i] == v then remove(o.t, i) return true end
  end
  return false
end
function list.index(_, o, _, v)
  for i = 1, #o.t do if o.t[i] == v then return i end end
  return nil
end
function list.totable(_, o)
  local r = {}
  for i = 1, #o.t do r[i] = o.t[i] end
  return r
end
list.copy = list.totable
function list.items(_, o)
  local r = {}
  for i = 1, #o.t do r[i] = { i, o.t[i] } end
  return r
end
function list.incr(_, o, _, i, n)
  if n == nil then n = 1 end
  if type(n) ~= "number" then error("incr: the step must be a number (got " .. type(n) .. ")", 0) end
  local j = must(o, i)
  if type(o.t[j]) ~= "number" then
    error("incr: the item at " .. j .. " is a " .. type(o.t[j]) .. ", not a number", 0)
  end
  o.t[j] = o.t[j] + n
  return o.t[j]
end
function list.apply(_, o, _, i, fn, ...)
  if type(fn) ~= "function" then error("apply: function expected, got " .. type(fn), 0) end
  local j = must(o, i)
  local v = fn(o.t[j], ...)
  notnil(v, "apply")
  o.t[j] = v
  return v
end

-- ---- Lock, RLock ----------------------------------------------------------

local lock = {}
kinds.Lock = lock
kinds.RLock = lock

function M.new_lock(reentrant)
  return { kind = reentrant and "RLock" or "Lock", owner = nil, count = 0,
           abandoned = false, waiters = {} }
end

-- give the free lock o to w's connection; -> true [, "abandoned"]
local function take(srv, o, conn, n)
  o.owner, o.count = conn, n or 1
  srv:hold(conn, o, true)
  if o.abandoned then
    o.abandoned = false
    return true, "abandoned"
  end
  return true
end

-- hand the free lock to the first live waiter; each waiter has its grant
local function wake_lock(srv, o)
  while o.owner == nil do
    local w = first_live(o.waiters)
    if not w then return end
    remove(o.waiters, 1)
    w.on_lock(srv, o, w)
  end
end
M.wake_lock = wake_lock

local function grant_acquire(srv, o, w)
  srv:grant(w, take(srv, o, w.conn))
end

function lock.acquire(srv, o, w, timeout)
  check_timeout(timeout)
  if o.owner == nil then return take(srv, o, w.conn) end
  if o.kind == "RLock" and o.owner == w.conn then
    o.count = o.count + 1
    return true
  end
  if timeout == 0 then return false end
  w.on_lock = grant_acquire
  o.waiters[#o.waiters + 1] = w
  return srv:park(w, timeout, function() return false end)
end

local function free(srv, o)
  srv:hold(o.owner, o, nil)
  o.owner, o.count = nil, 0
  wake_lock(srv, o)
end

function lock.release(srv, o, w)
  if o.owner == nil then error("release of an unlocked lock", 0) end
  if o.kind == "RLock" then
    if o.owner ~= w.conn then error("cannot release an RLock held by another process", 0) end
    o.count = o.count - 1
    if o.count > 0 then return end
  end
  free(srv, o)
end

function lock.locked(_, o) return o.owner ~= nil end

-- ---- Semaphore, BoundedSemaphore -------------------------------------------

local sem = {}
kinds.Semaphore = sem
kinds.BoundedSemaphore = sem

function M.new_semaphore(n, bounded)
  if n == nil then n = 1 end
  if mathtype(n) ~= "integer" or n < 0 then
    error("Semaphore: the value must be an integer >= 0 (got " .. tostring(n) .. ")", 0)
  end
  return { kind = bounded and "BoundedSemaphore" or "Semaphore", value = n,
           bound = bounded and n or nil, holders = {}, abandoned = 0, waiters = {} }
end

local function sem_take(srv, o, conn)
  o.value = o.value - 1
  o.holders[conn] = (o.holders[conn] or 0) + 1
  srv:hold(conn, o, true)
  if o.abandoned > 0 then
    o.abandoned = o.abandoned - 1
    return true, "abandoned"
  end
  return true
end

local function wake_sem(srv, o)
  while o.value > 0 do
    local w = first_live(o.waiters)
    if not w then return end
    remove(o.waiters, 1)
    srv:grant(w, sem_take(srv, o, w.conn))
  end
end

function sem.acquire(srv, o, w, timeout)
  check_timeout(timeout)
  if o.value > 0 and not first_live(o.waiters) then return sem_take(srv, o, w.conn) end
  if timeout == 0 then return false end
  o.waiters[#o.waiters + 1] = w
  return srv:park(w, timeout, function() return false end)
end

-- A release by a process that holds none (a producer signalling a
-- consumer) is charged to some holder, so that the counts the server
-- gives back when a connection drops never exceed what is held.
function sem.release(srv, o, w)
  if o.bound and o.value >= o.bound then error("semaphore released too many times", 0) end
  local c = w.conn
  if not o.holders[c] then c = next(o.holders) end
  if c then
    local n = o.holders[c] - 1
    o.holders[c] = n > 0 and n or nil
    if n <= 0 then srv:hold(c, o, nil) end
  end
  o.value = o.value + 1
  wake_sem(srv, o)
end

function sem.get_value(_, o) return o.value end

-- ---- Condition --------------------------------------------------------------

local cond = {}
kinds.Condition = cond

function M.new_condition(lockobj)
  return { kind = "Condition", lock = lockobj or M.new_lock(true), waiters = {} }
end

function cond.acquire(srv, o, w, timeout) return lock.acquire(srv, o.lock, w, timeout) end
function cond.release(srv, o, w) return lock.release(srv, o.lock, w) end
function cond.locked(_, o) return o.lock.owner ~= nil end

-- a waiter gets the lock back (with its count) before its answer
local function relock_grant(srv, l, w)
  take(srv, l, w.conn, w.saved)
  srv:grant(w, w.result)
end

local function relock(srv, o, w, result)
  w.result, w.on_lock = result, relock_grant
  if o.lock.owner == nil then
    relock_grant(srv, o.lock, w)
  else
    o.lock.waiters[#o.lock.waiters + 1] = w
  end
end

function cond.wait(srv, o, w, timeout)
  check_timeout(timeout)
  local l = o.lock
  if l.owner ~= w.conn then error("cannot wait on an un-acquired lock", 0) end
  w.saved = l.count
  srv:hold(l.owner, l, nil)
  l.owner, l.count = nil, 0
  wake_lock(srv, l)
  o.waiters[#o.waiters + 1] = w
  return srv:park(w, timeout, function()
    for i = 1, #o.waiters do
      if o.waiters[i] == w then remove(o.waiters, i) break end
    end
    w.done = false                   -- still waiting: for the lock now
    relock(srv, o, w, false)
    return srv.PARK
  end)
end

local function notify(srv, o, w, n)
  if o.lock.owner ~= w.conn then error("cannot notify on an un-acquired lock", 0) end
  local done = 0
  while done < n do
    local x = first_live(o.waiters)
    if not x then break end
    remove(o.waiters, 1)
    srv:unpark(x)
    relock(srv, o, x, true)
    done = done + 1
  end
end

function cond.notify(srv, o, w, n)
  if n == nil then n = 1 end
  if mathtype(n) ~= "integer" or n < 0 then error("notify: n must be an integer >= 0", 0) end
  notify(srv, o, w, n)
end
function cond.notify_all(srv, o, w) notify(srv, o, w, math.huge) end

-- ---- Event --------------------------------------------------------------

local event = {}
kinds.Event = event

function M.new_event() return { kind = "Event", flag = false, waiters = {} } end

function event.is_set(_, o) return o.flag end
function event.set(srv, o)
  o.flag = true
  local ws = o.waiters
  o.waiters = {}
  for _, w in ipairs(ws) do
    if not w.done then srv:grant(w, true) end
  end
end
function event.clear(_, o) o.flag = false end
function event.wait(srv, o, w, timeout)
  check_timeout(timeout)
  if o.flag then return true end
  if timeout == 0 then return false end
  o.waiters[#o.waiters + 1] = w
  return srv:park(w, timeout, function() return false end)
end

-- ---- Barrier -----------------------------------------------------------------

local barrier = {}
kinds.Barrier = barrier

function M.new_barrier(parties, action, timeout)
  if mathtype(parties) ~= "integer" or parties < 1 then
    error("Barrier: parties must be an integer >= 1 (got " .. tostring(parties) .. ")", 0)
  end
  if action ~= nil and type(action) ~= "function" then
    error("Barrier: action must be a function (got " .. type(action) .. ")", 0)
  end
  check_timeout(timeout)
  return { kind = "Barrier", parties = parties, action = action, timeout = timeout,
           waiting = {}, broken = false }
end

-- answer every waiting party with reason (they leave the barrier)
local function break_all(srv, o, reason)
  local ws = o.waiting
  o.waiting = {}
  for _, w in ipairs(ws) do
    if not w.done then srv:grant(w, nil, reason) end
  end
end

local function live_waiting(o)
  local n = 0
  for _, w in ipairs(o.waiting) do if not w.done then n = n + 1 end end
  return n
end

function barrier.wait(srv, o, w, timeout)
  check_timeout(timeout)
  if timeout == nil then timeout = o.timeout end
  if o.broken then return nil, "broken" end
  local ws = {}
  for _, x in ipairs(o.waiting) do if not x.done then ws[#ws + 1] = x end end
  o.waiting = ws
  ws[#ws + 1] = w
  if #ws < o.parties then
    return srv:park(w, timeout, function()
      o.broken = true
      break_all(srv, o, "broken")
      return nil, "timeout"
    end)
  end
  o.waiting = {}
  if o.action then
    local ok = srv:try(o.action)
    if not ok then
      o.broken = true
      o.waiting = ws
      break_all(srv, o, "broken")
      return nil, "broken"
    end
  end
  for i = 1, #ws - 1 do
    srv:unpark(ws[i])
    srv:grant(ws[i], i)
  end
  return #ws
end
function barrier.abort(srv, o)
  o.broken = true
  break_all(srv, o, "broken")
end
function barrier.reset(srv, o)
  break_all(srv, o, "broken")
  o.broken = false
end
function barrier.parties(_, o) return o.parties end
function barrier.n_waiting(_, o) return live_waiting(o) end
function barrier.broken(_, o) return o.broken end

-- ---- Queue, JoinableQueue -------------------------------------------------

local queue = {}
kinds.Queue = queue
kinds.JoinableQueue = queue

function M.new_queue(maxsize, joinable)
  if maxsize == nil then maxsize = 0 end
  if mathtype(maxsize) ~= "integer" or maxsize < 0 then
    error("Queue: maxsize must be an integer >= 0 (got " .. tostring(maxsize) .. ")", 0)
  end
  return { kind = joinable and "JoinableQueue" or "Queue", maxsize = maxsize,
           items = {}, head = 1, tail = 0, getters = {}, putters = {},
           unfinished = 0, joiners = {} }
end

local function qsize(o) return o.tail - o.head + 1 end
local function qfull(o) return o.maxsize > 0 and qsize(o) >= o.maxsize end
local function push(o, v)
  o.tail = o.tail + 1
  o.items[o.tail] = v
  o.unfinished = o.unfinished + 1
end
local function pop(o)
  local v = o.items[o.head]
  o.items[o.head] = nil
  o.head = o.head + 1
  if o.head > o.tail then o.head, o.tail = 1, 0 end
  return v
end

-- move items to waiting getters and waiting putters' items in, while
-- either can go on
local function pump(srv, o)
  while true do
    local moved = false
    if qsize(o) > 0 then
      local g = first_live(o.getters)
      if g then
        remove(o.getters, 1)
        srv:grant(g, pop(o))
        moved = true
      end
    end
    if not qfull(o) then
      local p = first_live(o.putters)
      if p then
        remove(o.putters, 1)
        push(o, p.item)
        srv:grant(p, true)
        moved = true
      end
    end
    if not moved then return end
  end
end

function queue.put(srv, o, w, v, timeout)
  if v == nil then error("put: nil is not a queue item", 0) end
  check_timeout(timeout)
  if not qfull(o) and not first_live(o.putters) then
    push(o, v)
    pump(srv, o)
    return true
  end
  if timeout == 0 then return nil, "full" end
  w.item = v
  o.putters[#o.putters + 1] = w
  return srv:park(w, timeout, function() return nil, "timeout" end)
end

function queue.get(srv, o, w, timeout)
  check_timeout(timeout)
  if qsize(o) > 0 then
    local v = pop(o)
    pump(srv, o)
    return v
  end
  if timeout == 0 then return nil, "empty" end
  o.getters[#o.getters + 1] = w
  return srv:park(w, timeout, function() return nil, "timeout" end)
end

function queue.qsize(_, o) return qsize(o) end
function queue.empty(_, o) return qsize(o) == 0 end
function queue.full(_, o) return qfull(o) end

function queue.task_done(srv, o)
  if o.kind ~= "JoinableQueue" then error("task_done: not a JoinableQueue", 0) end
  if o.unfinished <= 0 then error("task_done() called too many times", 0) end
  o.unfinished = o.unfinished - 1
  if o.unfinished == 0 then
    local ws = o.joiners
    o.joiners = {}
    for _, w in ipairs(ws) do if not w.done then srv:grant(w, true) end end
  end
end

function queue.join(srv, o, w, timeout)
  if o.kind ~= "JoinableQueue" then error("join: not a JoinableQueue", 0) end
  check_timeout(timeout)
  if o.unfinished == 0 then return true end
  if timeout == 0 then return nil, "timeout" end
  o.joiners[#o.joiners + 1] = w
  return srv:park(w, timeout, function() return nil, "timeout" end)
end

-- ---- Value, Array --------------------------------------------------------

-- type name -> {class, min, max}
local TYPES = {}
do
  local ints = {
    int8 = { -128, 127 }, uint8 = { 0, 255 }, int16 = { -32768, 32767 },
    uint16 = { 0, 65535 }, int32 = { -2147483648, 2147483647 },
    uint32 = { 0, 4294967295 }, int64 = { math.mininteger, math.maxinteger },
  }
  for name, r in pairs(ints) do TYPES[name] = { "int", r[1], r[2] } end
  TYPES.float = { "float" }
  TYPES.double = { "float" }
  TYPES.bool = { "bool" }
  local codes = { b = "int8", B = "uint8", h = "int16", H = "uint16", i = "int32",
                  I = "uint32", l = "int64", L = "int64", q = "int64", Q = "int64",
                  f = "float", d = "double", ["?"] = "bool", c = "uint8" }
  for code, name in pairs(codes) do TYPES[code] = TYPES[name] end
end

local function check_type(typ, fname)
  if TYPES[typ] == nil then
    error(fname .. ": unknown type " .. tostring(typ), 0)
  end
  return TYPES[typ]
end

local function coerce(spec, v, fname)
  local class = spec[1]
  if class == "int" then
    if type(v) == "number" and mathtype(v) == "float" and v == floor(v) then
      v = tointeger(v) or v
    end
    if mathtype(v) ~= "integer" or v < spec[2] or v > spec[3] then
      error(fname .. ": " .. tostring(v) .. " is not an integer in range", 0)
    end
  elseif class == "float" then
    if type(v) ~= "number" then error(fname .. ": number expected, got " .. type(v), 0) end
    v = v + 0.0
  elseif type(v) ~= "boolean" then
    error(fname .. ": boolean expected, got " .. type(v), 0)
  end
  return v
end

local value = {}
kinds.Value = value

function M.new_value(typ, init)
  local spec = check_type(typ, "Value")
  if init == nil then init = spec[1] == "bool" and false or 0 end
  return { kind = "Value", typ = typ, spec = spec, value = coerce(spec, init, "Value") }
end
function value.get(_, o) return o.value end
function value.set(_, o, _, v) o.value = coerce(o.spec, v, "Value") end

local array = {}
kinds.Array = array

function M.new_array(typ, init)
  local spec = check_type(typ, "Array")
  local t = {}
  if mathtype(init) == "integer" and init >= 0 then
    local zero = coerce(spec, spec[1] == "bool" and false or 0, "Array")
    for i = 1, init do t[i] = zero end
  elseif type(init) == "table" then
    for i = 1, #init do t[i] = coerce(spec, init[i], "Array") end
  else
    error("Array: a size (integer >= 0) or a list expected (got " .. tostring(init) .. ")", 0)
  end
  return { kind = "Array", typ = typ, spec = spec, t = t }
end
function array.getitem(_, o, _, i)
  if mathtype(i) ~= "integer" then error("Array index must be an integer", 0) end
  return o.t[i]
end
function array.setitem(_, o, _, i, v)
  if mathtype(i) ~= "integer" or i < 1 or i > #o.t then
    error("Array index " .. tostring(i) .. " out of range (length " .. #o.t .. ")", 0)
  end
  o.t[i] = coerce(o.spec, v, "Array")
end
function array.len(_, o) return #o.t end
array.totable = list.totable
array.items = list.items

-- ---- custom types (BaseManager:register) ------------------------------------

-- The object a registered callable returned; its exposed methods are
-- called as obj:method(...), in the server.
local custom = {}
kinds.custom = custom
M.custom_call = function(o, name, ...)
  local f = o.obj[name]
  if type(f) ~= "function" then
    error("'" .. tostring(name) .. "' is not a method of this object", 0)
  end
  return f(o.obj, ...)
end

-- The methods a registered object exposes by default: its function fields
-- and its class's (metatable __index table), whose names do not start
-- with '_'.
function M.exposed_of(obj)
  local names, seen = {}, {}
  local function scan(t)
    if type(t) ~= "table" then return end
    for k, v in pairs(t) do
      if type(k) == "string" and k:sub(1, 1) ~= "_" and type(v) == "function"
         and not seen[k] then
        seen[k] = true
        names[#names + 1] = k
      end
    end
  end
  scan(obj)
  local mt = getmetatable(obj)
  if type(mt) == "table" then scan(rawget(mt, "__index")) end
  sort(names)
  return names
end

-- ---- a dropped connection ----------------------------------------------------

-- What conn held of o goes back: a lock is freed, a semaphore gets conn's
-- count back; the next acquire that gets it says "abandoned".
function M.release_dropped(srv, o, conn)
  if o.kind == "Lock" or o.kind == "RLock" then
    if o.owner == conn then
      o.owner, o.count, o.abandoned = nil, 0, true
      wake_lock(srv, o)
    end
  elseif o.kind == "Semaphore" or o.kind == "BoundedSemaphore" then
    local n = o.holders[conn]
    if n then
      o.holders[conn] = nil
      o.value = o.value + n
      o.abandoned = o.abandoned + n
      wake_sem(srv, o)
    end
  end
end

return M
