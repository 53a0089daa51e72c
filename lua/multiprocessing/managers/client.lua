-- multiprocessing.managers.client: the client side of a manager's
-- transport (docs/managers.md): one connection per (process, manager), a
-- channel of two shared-memory queues beside it on a Unix socket, calls as
-- one round trip, spinning for the answer, and a ProcessError naming the
-- manager when it is gone.
--
-- The connection is shared by the process's proxies and opened again when
-- the pid changed (after a fork, two processes never share one socket or
-- answer queue). A call is {seq, oid, method, args...} -> {seq, ok,
-- results...}; the answer of an earlier call that a signal interrupted is
-- skipped by its seq. The references that proxies give back, and the one
-- a proxy without a reference takes, ride on the calls (msg.rel, msg.inc).

local core = require "multiprocessing.core"
local errors = require "multiprocessing.errors"
local connection = require "multiprocessing.connection"

local type, error, ipairs, pcall, tostring, require =
      type, error, ipairs, pcall, tostring, require
local pack, unpack = table.pack, table.unpack
local getpid, monotonic = core.getpid, core.monotonic

local M = {}

-- the library's logger when there is one (multiprocessing.log): the
-- managers log their starts and stops, the server refused peers
local has_log, log = pcall(require, "multiprocessing.log")
if not (has_log and type(log) == "table" and log.enabled) then log = nil end
M.log = log

local conns = {}            -- address .. "\0" .. authkey -> {conn=, pid=, addr=, key=}
local seq = 0
-- Reference counting (docs/managers.md, "Object lifetime"): the object
-- ids whose references this process's proxies gave back (their __gc),
-- per manager, sent with the next call to it (msg.rel); never a message
-- of their own, never from a finalizer.
local pending = {}          -- id -> {oid, ...}
-- The connection entry whose call is being encoded (M.sending) and whose
-- answer is being decoded (M.receiving), for proxies.lua: a proxy of the
-- manager a call goes to needs no transit reference, and one in its
-- answer holds a reference of the connection it came by.
M.sending, M.receiving = nil, nil
-- A caller spins (tries to receive without sleeping) for up to SPIN
-- seconds for its answer before it sleeps: the server usually answers
-- within microseconds, and waking from a sleep costs tens of them on a busy
-- or virtual machine. Spinning pays only while the machine has a CPU for
-- each spinning process: every 32nd call reads how many processes are
-- runnable (/proc/loadavg) and spins only if they are no more than the
-- CPUs. After FAILS spins in a row caught nothing (the answer is slow: a
-- parked call) it sleeps at once, and tries a spin again every 16th call.
-- A caller that spins sends its seq negated: the server, knowing that an
-- answer is awaited by a spinning caller whose next call will come soon,
-- spins for that call (server.lua), so that both sides leave sleeping
-- together at a probe.
M.SPIN, M.FAILS = 100e-6, 2
local fails, probe = 0, 0          -- spins in a row that caught nothing; calls
local ncpu, spin_ok, spin_checked = nil, true, 0

-- client.may_spin() -> boolean: are there CPUs to spare (see above)?
function M.may_spin()
  spin_checked = spin_checked + 1
  if spin_checked & 31 ~= 1 then return spin_ok end
  ncpu = ncpu or core.cpu_count()
  local f = io.open("/proc/loadavg")
  local running = f and tonumber((f:read("l") or ""):match("^%S+ %S+ %S+ (%d+)/"))
  if f then f:close() end
  spin_ok = running == nil or running <= ncpu
  return spin_ok
end
local may_spin = M.may_spin

local function gone(addr, why)
  return errors.new("ProcessError", "the manager at " .. tostring(addr) ..
                    " is gone (" .. tostring(why) .. ")")
end

-- close what this process opened for id (a forked child only drops the
-- entry it inherited: the parent's socket and queues stay the parent's)
local function forget(id)
  local e = conns[id]
  conns[id] = nil
  pending[id] = nil
  if e and e.pid == getpid() then
    pcall(e.conn.close, e.conn)
    for _, q in ipairs({ e.req, e.rep }) do
      pcall(q.cancel_join_thread, q)
      pcall(q.close, q)
    end
  end
end

-- the manager at addr is gone (why): forget connection id and raise
-- ProcessError
local function lost(addr, id, why)
  forget(id)
  error(gone(addr, why), 0)
end

local function result(addr, id, r)
  if type(r) ~= "table" then lost(addr, id, "it sent a malformed reply") end
  if r[2] then return unpack(r, 3, r.n or #r) end
  local e = r[3]
  if type(e) ~= "table" then e = { message = tostring(e) } end
  error(errors.new("RemoteError", e.message, { traceback = e.traceback, pid = e.pid }), 0)
end

-- pcall(f, a, b) with M[field] (sending or receiving) naming the
-- connection entry e meanwhile: proxies.lua reads it while a call is
-- encoded or an answer decoded
local function pcall_as(field, e, f, a, b)
  local prev = M[field]
  M[field] = e
  local ok, r1, r2 = pcall(f, a, b)
  M[field] = prev
  return ok, r1, r2
end

-- io_result(addr, id, pcall_as(...)) -> what the send or receive returned.
-- An error object (a value that cannot be encoded, or decoded here: read
-- whole, so the connection is still in step) or an interrupt is raised as
-- it is; any other error means the manager is gone.
local function io_result(addr, id, ok, r, why)
  if not ok then
    if core._is_interrupt(r) or errors.is_error(r) then error(r, 0) end
    lost(addr, id, r)
  end
  return r, why
end

-- Receive on the socket: -> the reply r, or nil (nothing yet) when
-- timeout is 0; raises ProcessError when the manager is gone.
local function sock_recv(e, addr, id, timeout)
  local c = e.conn
  local r, why = io_result(addr, id, pcall_as("receiving", e, c.recv, c, timeout))
  if r == nil and why ~= "timeout" then lost(addr, id, why or "closed") end
  return r
end

local function mine(r, my)
  if type(r) ~= "table" then return true end
  local s = r[1]
  return s == my or s == 0
end

-- one call over the socket; my is the seq sent (negated if spinning)
local function sock_call(e, addr, id, my, msg, spinning)
  local c = e.conn
  local sent, why = io_result(addr, id, pcall_as("sending", e, c.send, c, msg))
  if not sent then lost(addr, id, why) end
  local t0 = spinning and monotonic()
  while true do
    local r = sock_recv(e, addr, id, spinning and 0 or nil)
    if r == nil then
      if monotonic() - t0 > M.SPIN then       -- no answer yet: sleep for it
        spinning = false
        fails = fails + 1
      end
    elseif mine(r, my) then
      if spinning then fails = 0 end
      return result(addr, id, r)
    end
    -- else the reply to a call that a signal interrupted: skipped
  end
end

-- The answer to a call sent on the channel: it comes on the reply queue
-- (or on the socket, when it holds a handle with fds, which a queue cannot
-- carry). The wait on the queue is cut in slices, from SLICE to
-- SLICE_MAX seconds, after each of which the socket is looked at: a
-- manager that died closed it.
M.SLICE, M.SLICE_MAX = 0.01, 0.2
local function chan_wait(e, addr, id, my, spinning)
  local rep, slice = e.rep, M.SLICE
  if spinning then
    local t0 = monotonic()
    repeat
      local ok, r = pcall_as("receiving", e, rep.get, rep, 0)
      if not ok then break end               -- the loop below sees it again
      if r ~= nil and mine(r, my) then
        fails = 0
        return result(addr, id, r)
      end
    until monotonic() - t0 > M.SPIN
    fails = fails + 1
  end
  while true do
    local r = io_result(addr, id, pcall_as("receiving", e, rep.get, rep, slice))
    if r ~= nil then
      if mine(r, my) then return result(addr, id, r) end
    elseif e.conn:poll() then
      r = sock_recv(e, addr, id, 0)
      if r ~= nil and mine(r, my) then return result(addr, id, r) end
    else
      slice = slice * 2
      if slice > M.SLICE_MAX then slice = M.SLICE_MAX end
    end
  end
end

-- A channel: two of the library's queues (shared memory) that the server
-- makes for this process and hands over the authenticated Unix socket;
-- a call through them costs about a third of one through the socket.
-- The socket stays: it proves the key, carries what a queue cannot (fds),
-- and its end tells each side that the other is gone.
M.CHANNEL = true

local last_addr, last_key, last_id     -- the id of the last connect, cached
-- -> the entry {conn=, pid=, req=, rep=} of this process for the manager
local function connect(addr, key, nochan)
  local id
  if addr == last_addr and key == last_key then id = last_id
  else
    id = addr .. "\0" .. key
    last_addr, last_key, last_id = addr, key, id
  end
  local e = conns[id]
  local pid = getpid()
  if e then
    if e.pid == pid then return e, id end
    -- inherited through a fork: the parent's socket, not ours to use;
    -- closing our copy of the fd leaves the parent's open
    conns[id] = nil
    pending[id] = nil                  -- the parent's to send, not ours
    pcall(e.conn.close, e.conn)
  end
  local ok, c = pcall(connection.exports.Client, addr, { authkey = key })
  if not ok then
    -- the socket refused or gone (an OSError): the manager is gone
    if (errors.is_error(c) and not errors.OSError:is(c)) or core._is_interrupt(c) then
      error(c, 0)
    end
    local why = errors.OSError:is(c) and c.message or tostring(c):gsub("^.-: ", "", 1)
    error(gone(addr, "cannot connect: " .. why), 0)
  end
  e = { conn = c, pid = pid, addr = addr, key = key }
  conns[id] = e
  if M.CHANNEL and not nochan and not addr:find(":%d+$") then  -- a Unix socket: fds travel
    seq = seq + 1
    local okc, req, rep = pcall(sock_call, e, addr, id, seq, pack(seq, 0, "channel"), false)
    if okc and req and rep then e.req, e.rep = req, rep
    elseif not okc and not errors.RemoteError:is(req) then
      error(req, 0)                    -- gone, or a signal; RemoteError: no channel
    end
  end
  return e, id
end

-- send msg (on the channel, else the socket) and wait for its answer;
-- st: the proxy state whose reference msg.inc takes, once msg is sent
local function go(e, addr, id, my, msg, spinning, st)
  local rel = pending[id]
  if rel then
    pending[id] = nil                  -- lost if the send fails: the safe side
    msg.rel = rel
  end
  local req = e.req
  if req then
    local ok, err = pcall_as("sending", e, req.put, req, msg)
    if ok then
      if st then st.owner = e end
      return chan_wait(e, addr, id, my, spinning)
    end
    if core._is_interrupt(err) then error(err, 0) end
    if not errors.is_error(err) then lost(addr, id, err) end
    -- a value the queue cannot carry (a handle with fds): by the socket
  end
  if st then st.owner = e end          -- sock_call raises if the send fails
  return sock_call(e, addr, id, my, msg, spinning)
end

-- call_on(addr, key, st, oid, method, ...) -> the results of method on
-- object oid. st: the state of the proxy making the call, or nil; a proxy
-- that holds no reference of this process's connection (inherited through
-- a fork, or its manager's connection opened again) takes one with the
-- call (msg.inc), so that what it names lives while it does.
local function call_on(addr, key, st, oid, method, ...)
  local e, id = connect(addr, key)
  seq = seq + 1
  probe = probe + 1
  local spinning = (fails < M.FAILS or probe & 15 == 0) and may_spin()
  local my = spinning and -seq or seq
  local msg = pack(my, oid, method, ...)
  if st and st.owner ~= e then
    msg.inc = true
    return go(e, addr, id, my, msg, spinning, st)
  end
  return go(e, addr, id, my, msg, spinning)
end

-- call(addr, key, oid, method, ...) -> the results of method on object oid
local function call(addr, key, oid, method, ...)
  return call_on(addr, key, nil, oid, method, ...)
end
M.call = call

-- call_st(st, method, ...): a proxy's call (st: its state)
function M.call_st(st, method, ...)
  return call_on(st.addr, st.key, st, st.oid, method, ...)
end

-- client.owner(addr, key) -> this process's connection entry for the
-- manager (what a proxy's st.owner names when it holds a reference), or nil
function M.owner(addr, key)
  local e = conns[addr .. "\0" .. key]
  if e and e.pid == getpid() then return e end
  return nil
end

-- client.release(st): a proxy's __gc: give its reference back with the
-- next call to its manager; nothing if it holds none, or its connection
-- is gone. Never raises, never blocks, sends nothing.
function M.release(st)
  local e = st.owner
  if not e or e.pid ~= getpid() then return end
  local id = st.addr .. "\0" .. st.key
  if conns[id] ~= e then return end
  local l = pending[id]
  if not l then
    l = {}
    pending[id] = l
  end
  l[#l + 1] = st.oid
end

-- client.transit(st) -> true if the manager took a transit reference for
-- the proxy being serialized (docs/managers.md), false if it could not
-- (the manager or the object is gone: the proxy is of no use anyway)
function M.transit(st)
  local ok, got = pcall(call, st.addr, st.key, 0, "transit", st.oid)
  if not ok then
    if core._is_interrupt(got) then error(got, 0) end
    return false
  end
  return got == true
end

-- client.adopt(st): the receiver of a proxy with a transit reference makes
-- it its connection's (at once: nothing is pending if it never calls)
function M.adopt(st)
  local ok, got = pcall(call, st.addr, st.key, 0, "adopt", st.oid)
  if not ok then
    if core._is_interrupt(got) then error(got, 0) end
    return
  end
  if got then st.owner = M.owner(st.addr, st.key) end
end

-- post(addr, key, oid, method): send the call and wait for nothing (the
-- owner's shutdown: a server busy in a long call must not hold it)
function M.post(addr, key, oid, method)
  local e = connect(addr, key, true)   -- no channel: one message, no round trip
  seq = seq + 1
  local c = e.conn
  c:send(pack(seq, oid, method))
end
M.forget = forget

return M
