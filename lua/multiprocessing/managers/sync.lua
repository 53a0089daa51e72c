-- multiprocessing.managers.sync: the manager's sync objects and queues
-- as its server holds them (docs/managers.md): Lock, RLock, Semaphore,
-- BoundedSemaphore, Condition, Event, Barrier, Queue, JoinableQueue;
-- their kinds join managers/objects.lua's table.
--
-- A call that must wait is parked (srv:park) in the object's FIFO of
-- waiters and answered by srv:grant when the object can grant it, or by
-- its on_timeout when its deadline passes. Waiter lists are plain arrays
-- with lazy removal: a waiter that was answered, or whose connection
-- dropped, has w.done set and is skipped.
--
-- Locks and semaphores remember which connection holds them (srv:hold),
-- so that the server can release them when that connection drops
-- (release_dropped below); the next acquire then says "abandoned".

local objects = require "multiprocessing.managers.objects"

local type, error, ipairs, tostring, next = type, error, ipairs, tostring, next
local mathtype = math.type
local remove = table.remove

local M = {}
local kind = objects.kind

local function check_timeout(t)
  if t ~= nil and (type(t) ~= "number" or not (t >= 0)) then
    error("timeout must be a number >= 0 (got " .. tostring(t) .. ")", 0)
  end
  return t
end

-- Append waiter w to list. A waiter whose wait timed out is only marked
-- done (first_live drops it when the object next grants), so a client
-- that polls an idle object with short timeouts would grow the list
-- without end: every 32 appends the done ones are dropped first.
local function push_waiter(list, w)
  local n = #list
  if n >= 32 and n % 32 == 0 then
    local j = 0
    for i = 1, n do
      local x = list[i]
      list[i] = nil
      if not x.done then j = j + 1; list[j] = x end
    end
    n = j
  end
  list[n + 1] = w
end
M.push_waiter = push_waiter               -- (server.lua's list of timed waits too)

-- the first waiter of list not done (removing the done ones before it)
local function first_live(list)
  while list[1] and list[1].done do remove(list, 1) end
  return list[1]
end

-- ---- Lock, RLock ----------------------------------------------------------

local lock = kind("Lock", "RLock")

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
  push_waiter(o.waiters, w)
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

-- v, or default when nil; raises "<what> must be an integer >= min (got v)"
-- for anything else (in the server: the caller gets it as its error)
local function int_at_least(v, default, min, what)
  if v == nil then v = default end
  if mathtype(v) ~= "integer" or v < min then
    error(what .. " must be an integer >= " .. min .. " (got " .. tostring(v) .. ")", 0)
  end
  return v
end

-- ---- Semaphore, BoundedSemaphore -------------------------------------------

local sem = kind("Semaphore", "BoundedSemaphore")

function M.new_semaphore(n, bounded)
  n = int_at_least(n, 1, 0, "Semaphore: the value")
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
  push_waiter(o.waiters, w)
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

local cond = kind("Condition")

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
    push_waiter(o.lock.waiters, w)
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
  push_waiter(o.waiters, w)
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
  n = int_at_least(n, 1, 0, "notify: n")
  notify(srv, o, w, n)
end
function cond.notify_all(srv, o, w) notify(srv, o, w, math.huge) end

-- ---- Event --------------------------------------------------------------

local event = kind("Event")

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
  push_waiter(o.waiters, w)
  return srv:park(w, timeout, function() return false end)
end

-- ---- Barrier -----------------------------------------------------------------

local barrier = kind("Barrier")

function M.new_barrier(parties, action, timeout)
  int_at_least(parties, nil, 1, "Barrier: parties")
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

local queue = kind("Queue", "JoinableQueue")

function M.new_queue(maxsize, joinable)
  maxsize = int_at_least(maxsize, 0, 0, "Queue: maxsize")
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
        p.item = nil                      -- (its wait may stay listed a while)
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
  push_waiter(o.putters, w)
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
  push_waiter(o.getters, w)
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
  push_waiter(o.joiners, w)
  return srv:park(w, timeout, function() return nil, "timeout" end)
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
