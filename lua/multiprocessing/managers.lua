-- multiprocessing.managers: BaseManager, SyncManager, mp.Manager and the
-- proxies (docs/managers.md).
--
-- A manager is a server process (managers/server.lua, one event loop) that
-- holds plain Lua values and small sync state machines
-- (managers/objects.lua); this module is the client side. A proxy is an
-- empty table whose metatable knows its kind; what it needs to reach its
-- object (address, authkey, object id, kind) lives in a weak side table,
-- never in the proxy's own fields, so that every key (including "_x") is
-- free for d[k]. A proxy is a handle (__mp_reduce, docs/design.md,
-- decision 1) of kind "ManagerProxy" with no fds: it travels through
-- pipes, queues and process arguments and reconnects in the receiver.
--
-- Transport: one Client connection per (process, manager), shared by that
-- process's proxies and opened again when the pid changed (after a fork,
-- two processes never share one socket). A call is one round trip,
-- {seq, oid, method, args...} -> {seq, ok, results...}; replies of an
-- earlier call that was interrupted (a signal's error) are skipped by seq.

local core = require "multiprocessing.core"
local errors = require "multiprocessing.errors"
local connection = require "multiprocessing.connection"
local process = require "multiprocessing.process"

local type, error, pairs, ipairs, pcall, tostring, setmetatable, getmetatable, rawget, require =
      type, error, pairs, ipairs, pcall, tostring, setmetatable, getmetatable, rawget, require
local pack, unpack = table.pack, table.unpack
local getpid, monotonic = core.getpid, core.monotonic
local mathtype = math.type

-- the library's logger when there is one (multiprocessing.log): manager
-- starts and stops are logged at INFO
local has_log, log = pcall(require, "multiprocessing.log")
if not (has_log and type(log) == "table" and log.enabled) then log = nil end

local M = {}
local exports = {}
M.exports = exports
M._log = log

-- ---- transport --------------------------------------------------------------

local conns = {}            -- address .. "\0" .. authkey -> {conn=, pid=}
local seq = 0
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

-- managers._may_spin() -> boolean: are there CPUs to spare (see above)?
function M._may_spin()
  spin_checked = spin_checked + 1
  if spin_checked & 31 ~= 1 then return spin_ok end
  ncpu = ncpu or core.cpu_count()
  local f = io.open("/proc/loadavg")
  local running = f and tonumber((f:read("l") or ""):match("^%S+ %S+ %S+ (%d+)/"))
  if f then f:close() end
  spin_ok = running == nil or running <= ncpu
  return spin_ok
end
local may_spin = M._may_spin

local function gone(addr, why)
  return errors.new("ProcessError", "the manager at " .. tostring(addr) ..
                    " is gone (" .. tostring(why) .. ")")
end

-- close what this process opened for id (a forked child only drops the
-- entry it inherited: the parent's socket and queues stay the parent's)
local function forget(id)
  local e = conns[id]
  conns[id] = nil
  if e and e.pid == getpid() then
    pcall(e.conn.close, e.conn)
    for _, q in ipairs({ e.req, e.rep }) do
      pcall(q.cancel_join_thread, q)
      pcall(q.close, q)
    end
  end
end

local function result(addr, id, r)
  if type(r) ~= "table" then
    forget(id)
    error(gone(addr, "it sent a malformed reply"), 0)
  end
  if r[2] then return unpack(r, 3, r.n or #r) end
  local e = r[3]
  if type(e) ~= "table" then e = { message = tostring(e) } end
  error(errors.new("RemoteError", e.message, { traceback = e.traceback, pid = e.pid }), 0)
end

-- Receive on the socket: -> the reply r, or nil (nothing yet) when
-- timeout is 0; raises ProcessError when the manager is gone.
local function sock_recv(e, addr, id, timeout)
  local c = e.conn
  local okr, r, rwhy = pcall(c.recv, c, timeout)
  if not okr then
    -- a reply that cannot be decoded here (a class this process has not
    -- registered) was read whole: the connection is still in step
    if core._is_interrupt(r) or errors.is_error(r) then error(r, 0) end
    forget(id)
    error(gone(addr, r), 0)
  end
  if r == nil and rwhy ~= "timeout" then
    forget(id)
    error(gone(addr, rwhy or "closed"), 0)
  end
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
  local ok, sent, why = pcall(c.send, c, msg)
  if not ok then
    if errors.is_error(sent) or core._is_interrupt(sent) then error(sent, 0) end
    forget(id)
    error(gone(addr, sent), 0)
  end
  if not sent then
    forget(id)
    error(gone(addr, why), 0)
  end
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
      local ok, r = pcall(rep.get, rep, 0)
      if not ok then break end               -- the loop below sees it again
      if r ~= nil and mine(r, my) then
        fails = 0
        return result(addr, id, r)
      end
    until monotonic() - t0 > M.SPIN
    fails = fails + 1
  end
  while true do
    local ok, r = pcall(rep.get, rep, slice)
    if not ok then
      if core._is_interrupt(r) or errors.is_error(r) then error(r, 0) end
      forget(id)
      error(gone(addr, r), 0)
    end
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
local function connect(addr, key)
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
    pcall(e.conn.close, e.conn)
  end
  local ok, c = pcall(connection.exports.Client, addr, { authkey = key })
  if not ok then
    if errors.is_error(c) or core._is_interrupt(c) then error(c, 0) end
    error(gone(addr, "cannot connect: " .. tostring(c):gsub("^.-: ", "", 1)), 0)
  end
  e = { conn = c, pid = pid }
  conns[id] = e
  if M.CHANNEL and not addr:find(":%d+$") then      -- a Unix socket: fds travel
    seq = seq + 1
    local okc, req, rep = pcall(sock_call, e, addr, id, seq, pack(seq, 0, "channel"), false)
    if okc and req and rep then e.req, e.rep = req, rep
    elseif not okc and not errors.RemoteError:is(req) then
      error(req, 0)                    -- gone, or a signal; RemoteError: no channel
    end
  end
  return e, id
end

-- call(addr, key, oid, method, ...) -> the results of method on object oid
local function call(addr, key, oid, method, ...)
  local e, id = connect(addr, key)
  seq = seq + 1
  probe = probe + 1
  local spinning = (fails < M.FAILS or probe & 15 == 0) and may_spin()
  local my = spinning and -seq or seq
  local msg = pack(my, oid, method, ...)
  local req = e.req
  if req then
    local ok, err = pcall(req.put, req, msg)
    if ok then return chan_wait(e, addr, id, my, spinning) end
    if core._is_interrupt(err) then error(err, 0) end
    if not errors.is_error(err) then
      forget(id)
      error(gone(addr, err), 0)
    end
    -- a value the queue cannot carry (a handle with fds): by the socket
  end
  return sock_call(e, addr, id, my, msg, spinning)
end
M._call = call

-- ---- proxies ----------------------------------------------------------------

local pstate = setmetatable({}, { __mode = "k" })     -- proxy -> state
local mts = {}                                         -- kind -> metatable

local function st_of(p)
  local st = pstate[p]
  if not st then error("bad self: a manager proxy expected (use ':' to call its methods)", 3) end
  return st
end

-- managers._proxy_state(p) -> {addr=, key=, oid=, kind=, exposed=} or nil
function M._proxy_state(p) return pstate[p] end

local function new_proxy(st)
  local p = setmetatable({}, mts[st.kind] or mts.custom)
  pstate[p] = st
  return p
end

local function remote(name)
  return function(p, ...)
    local st = st_of(p)
    return call(st.addr, st.key, st.oid, name, ...)
  end
end

local function reduce(p)
  local st = pstate[p]
  return "ManagerProxy", { addr = st.addr, key = st.key, oid = st.oid, kind = st.kind,
                           exposed = st.exposed }
end

core.register_handle("ManagerProxy", function(st)
  if type(st) ~= "table" or type(st.addr) ~= "string" or type(st.key) ~= "string"
     or mathtype(st.oid) ~= "integer" or type(st.kind) ~= "string"
     or (st.exposed ~= nil and type(st.exposed) ~= "table") then
    error(errors.new("SerializationError", "malformed manager proxy"), 0)
  end
  return new_proxy(st)
end)

local function tostr(p)
  local st = pstate[p]
  return "<" .. st.kind .. "Proxy(" .. st.oid .. ", manager " .. st.addr .. ")>"
end

local function snapshot(p)
  local items = call(pstate[p].addr, pstate[p].key, pstate[p].oid, "items")
  local i = 0
  return function()
    i = i + 1
    local it = items[i]
    if it then return it[1], it[2] end
  end, p, nil
end

-- a metatable for kind: methods by name, other keys through get/set
local function kind_mt(kind, names, get, set, extra)
  local methods = {}
  for _, n in ipairs(names) do methods[n] = remote(n) end
  for k, v in pairs(extra or {}) do methods[k] = v end
  local mt = {
    __name = "multiprocessing." .. kind .. "Proxy",
    __mp_reduce = reduce,
    __tostring = tostr,
    __index = function(p, k)
      local m = methods[k]
      if m ~= nil then return m end
      if get then return get(p, k) end
      return nil
    end,
    __newindex = function(p, k, v)
      if not set then error("cannot set field '" .. tostring(k) .. "' of a " .. kind .. " proxy", 2) end
      set(p, k, v)
    end,
  }
  mts[kind] = mt
  return mt, methods
end

local function getitem(p, k)
  local st = pstate[p]
  return (call(st.addr, st.key, st.oid, "getitem", k))
end
local function setitem(p, k, v)
  local st = pstate[p]
  call(st.addr, st.key, st.oid, "setitem", k, v)
end
local function len(p)
  local st = pstate[p]
  return (call(st.addr, st.key, st.oid, "len"))
end

local dict_mt, dict_methods = kind_mt("dict",
  { "get", "keys", "values", "items", "update", "pop", "setdefault", "clear", "copy",
    "incr", "apply" }, getitem, setitem)
dict_methods.totable = dict_methods.copy
dict_mt.__len = len
dict_mt.__pairs = snapshot

local list_mt = kind_mt("list",
  { "append", "extend", "insert", "pop", "remove", "index", "totable", "copy", "incr",
    "apply" },
  function(p, k) if mathtype(k) == "integer" then return getitem(p, k) end end,
  function(p, k, v)
    if mathtype(k) ~= "integer" then error("list index must be an integer (got " .. tostring(k) .. ")", 3) end
    setitem(p, k, v)
  end)
list_mt.__len = len
list_mt.__pairs = snapshot

local function ns_name(k)
  if type(k) ~= "string" or k:sub(1, 1) == "_" then
    error("Namespace: a field name must be a string not starting with '_' (got "
          .. tostring(k) .. ")", 3)
  end
end
local ns_mt = kind_mt("Namespace", {},
  function(p, k) ns_name(k) return getitem(p, k) end,
  function(p, k, v) ns_name(k) setitem(p, k, v) end)
ns_mt.__pairs = snapshot

-- lock:with(fn, ...) -> fn's results, the lock held during fn
local function with(self, fn, ...)
  self:acquire()
  local r = pack(pcall(fn, ...))
  self:release()
  if not r[1] then error(r[2], 0) end
  return unpack(r, 2, r.n)
end

kind_mt("Lock", { "acquire", "release", "locked" }, nil, nil, { with = with })
mts.RLock = mts.Lock
kind_mt("Semaphore", { "acquire", "release", "get_value" }, nil, nil, { with = with })
mts.BoundedSemaphore = mts.Semaphore

-- cond:wait_for(pred [, timeout]) -> pred's last value
local function wait_for(self, pred, timeout)
  local r = pred()
  if r then return r end
  local deadline = timeout and monotonic() + timeout
  while not r do
    local left
    if deadline then
      left = deadline - monotonic()
      if left <= 0 then break end
    end
    self:wait(left)
    r = pred()
  end
  return r
end
kind_mt("Condition", { "acquire", "release", "locked", "wait", "notify", "notify_all" },
        nil, nil, { with = with, wait_for = wait_for })

kind_mt("Event", { "is_set", "set", "clear", "wait" })

local BARRIER_FIELDS = { parties = true, n_waiting = true, broken = true }
kind_mt("Barrier", { "wait", "abort", "reset" },
  function(p, k)
    if BARRIER_FIELDS[k] then
      local st = pstate[p]
      return (call(st.addr, st.key, st.oid, k))
    end
  end)

local function nowait_put(self, v) return self:put(v, 0) end
local function nowait_get(self) return self:get(0) end
local function noop() end
kind_mt("Queue", { "put", "get", "qsize", "empty", "full", "task_done", "join" }, nil, nil,
  { put_nowait = nowait_put, get_nowait = nowait_get, close = noop, join_thread = noop,
    cancel_join_thread = noop })
mts.JoinableQueue = mts.Queue

kind_mt("Value", { "get", "set" },
  function(p, k)
    if k == "value" then
      local st = pstate[p]
      return (call(st.addr, st.key, st.oid, "get"))
    end
  end,
  function(p, k, v)
    if k ~= "value" then error("cannot set field '" .. tostring(k) .. "' of a Value proxy", 3) end
    local st = pstate[p]
    call(st.addr, st.key, st.oid, "set", v)
  end)

local array_mt = kind_mt("Array", { "totable" },
  function(p, k) if mathtype(k) == "integer" then return getitem(p, k) end end,
  function(p, k, v) setitem(p, k, v) end)
array_mt.__len = len

-- a registered type's object: its exposed methods
mts.custom = {
  __name = "multiprocessing.Proxy",
  __mp_reduce = reduce,
  __tostring = tostr,
  __index = function(p, k)
    local st = pstate[p]
    local ms = st.methods
    if not ms then
      ms = {}
      for _, n in ipairs(st.exposed or {}) do ms[n] = remote(n) end
      st.methods = ms
    end
    return ms[k]
  end,
}

-- ---- managers ------------------------------------------------------------

local SYNC_TYPEIDS = { "dict", "list", "Namespace", "Queue", "JoinableQueue", "Lock",
  "RLock", "Semaphore", "BoundedSemaphore", "Condition", "Event", "Barrier", "Value",
  "Array" }

local Manager = {}            -- the methods
local MMT = {}
local counter = 0

-- The key of managers made without one: the process's authkey when the
-- process has one, else a random key made once in this process and
-- inherited by forked children (spawned ones get it with each proxy or
-- manager object they are given).
local process_key
local function default_authkey()
  local ok, k = pcall(function() return process.exports.current_process().authkey end)
  if ok and type(k) == "string" and k ~= "" then return k end
  if not process_key then process_key = require("multiprocessing.auth").random_bytes(32) end
  return process_key
end
M._default_authkey = default_authkey

local function check_opts(opts, fname)
  if opts == nil then return {} end
  if type(opts) ~= "table" then
    error("bad argument #1 to '" .. fname .. "' (table expected, got " .. type(opts) .. ")", 3)
  end
  for k in pairs(opts) do
    if k ~= "address" and k ~= "authkey" and k ~= "start_method" then
      error(fname .. ": unknown option '" .. tostring(k) .. "'", 3)
    end
  end
  if opts.address ~= nil and (type(opts.address) ~= "string" or opts.address == "") then
    error(fname .. ": 'address' must be a non-empty string", 3)
  end
  if opts.authkey ~= nil and (type(opts.authkey) ~= "string" or opts.authkey == "") then
    error(fname .. ": 'authkey' must be a non-empty string", 3)
  end
  local m = opts.start_method
  if m ~= nil and not process.METHODS[m] then
    error(fname .. ": 'start_method' must be \"fork\", \"spawn\" or \"forkserver\"", 3)
  end
  return opts
end

local function new_manager(opts, kind)
  counter = counter + 1
  return setmetatable({
    _registry = {}, _state = "initial", _kind = kind, _name = kind .. "-" .. counter,
    _address = opts.address, _authkey = opts.authkey, _method = opts.start_method,
  }, MMT)
end

-- mp.BaseManager{address=, authkey=, start_method=} -> a manager, not started
function exports.BaseManager(opts)
  return new_manager(check_opts(opts, "BaseManager"), "BaseManager")
end

local function register_sync(m)
  for _, t in ipairs(SYNC_TYPEIDS) do m._registry[t] = { builtin = t } end
  return m
end

-- mp.SyncManager{...} -> a manager with the standard typeids, not started
function exports.SyncManager(opts)
  return register_sync(new_manager(check_opts(opts, "SyncManager"), "SyncManager"))
end

-- mp.Manager([{address=, authkey=, start_method=}]) -> a started SyncManager
function exports.Manager(opts)
  local m = register_sync(new_manager(check_opts(opts, "Manager"), "SyncManager"))
  return m:start()
end

local PROXYTYPES = { dict = true, list = true, Namespace = true }

-- m:register(typeid [, callable [, {exposed={names}, proxytype=kind}]]) -> m
function Manager.register(self, typeid, callable, opts)
  if type(typeid) ~= "string" or typeid == "" or typeid:sub(1, 1) == "_" or Manager[typeid] then
    error("bad argument #1 to 'register' (a typeid: a name that is not a manager method "
          .. "and does not start with '_', got " .. tostring(typeid) .. ")", 2)
  end
  if callable ~= nil and type(callable) ~= "function" then
    local mt = getmetatable(callable)
    if not (type(mt) == "table" and mt.__call) then
      error("bad argument #2 to 'register' (function expected, got " .. type(callable) .. ")", 2)
    end
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("bad argument #3 to 'register' (table expected, got " .. type(opts) .. ")", 2)
  end
  opts = opts or {}
  for k in pairs(opts) do
    if k ~= "exposed" and k ~= "proxytype" then
      error("register: unknown option '" .. tostring(k) .. "'", 2)
    end
  end
  if opts.exposed ~= nil then
    if type(opts.exposed) ~= "table" then error("register: 'exposed' must be a list of names", 2) end
    for _, n in ipairs(opts.exposed) do
      if type(n) ~= "string" then error("register: 'exposed' must be a list of names", 2) end
    end
  end
  if opts.proxytype ~= nil and not PROXYTYPES[opts.proxytype] then
    error("register: 'proxytype' must be \"dict\", \"list\" or \"Namespace\"", 2)
  end
  if self._state == "started" or self._state == "serving" then
    error("register: the manager's server is already running", 2)
  end
  self._registry[typeid] = { callable = callable, exposed = opts.exposed,
                             proxytype = opts.proxytype }
  return self
end

local function key_of(self)
  if not self._authkey then self._authkey = default_authkey() end
  return self._authkey
end

local function check_running(self, fname)
  local s = self._state
  if s ~= "started" and s ~= "connected" then
    error(errors.new("ProcessError", fname .. ": the manager is " ..
          (s == "initial" and "not started (call start() or connect())" or s)), 3)
  end
end

-- m:<typeid>(...) -> a proxy of a new object made in the server
local function creator(typeid)
  return function(self, ...)
    if getmetatable(self) ~= MMT then
      error("bad self: a manager expected (use ':' to call m:" .. typeid .. "(...))", 2)
    end
    check_running(self, typeid)
    local addr, key = self.address, self._authkey
    local oid, kind, exposed = call(addr, key, 0, "create", typeid, ...)
    -- the proxy keeps its manager alive (its __gc would stop the server)
    return new_proxy({ addr = addr, key = key, oid = oid, kind = kind, exposed = exposed,
                       mgr = self })
  end
end
local creators = {}

-- A fresh private directory for the Unix socket (mode 0700, made by
-- mkdir, which fails rather than reuse a name that exists).
local function private_dir()
  local base = os.getenv("TMPDIR")
  if not base or base == "" then base = "/tmp" end
  local rnd = require("multiprocessing.auth").random_bytes(8)
  local hex = rnd:gsub(".", function(ch) return ("%02x"):format(ch:byte()) end)
  local dir = base .. "/mp-manager-" .. getpid() .. "-" .. hex
  if not os.execute("mkdir -m 700 '" .. dir:gsub("'", "'\\''") .. "' 2>/dev/null") then
    error(errors.new("ProcessError", "cannot make a directory for the manager's socket in " .. base), 3)
  end
  return dir
end

-- The registry as the server gets it (the callables travel with it).
local function server_spec(self, address)
  return { address = address, authkey = key_of(self), registry = self._registry }
end

-- The server child's target: listen, say where, serve until shutdown.
function M._serve_child(spec, reply)
  core._sigint(true)          -- Ctrl-C is for the program, not its server
  local server = require "multiprocessing.managers.server"
  local ok, srv = pcall(server.new, spec)
  if not ok then
    reply:send({ false, tostring(srv) })
    return
  end
  reply:send({ true, srv.address })
  reply:close()
  srv:serve()
end

-- m:start() -> m: a daemonic child process serves (the default start
-- method, or the manager's start_method); the call returns once it listens
function Manager.start(self)
  if self._state ~= "initial" then
    error(errors.new("ProcessError", "start: the manager is " .. self._state ..
          " (a manager starts once)"), 2)
  end
  local address = self._address
  if not address then
    self._dir = private_dir()
    address = self._dir .. "/manager.sock"
  end
  local mp = require "multiprocessing"
  local r, w = mp.Pipe(false)
  local p = mp.Process{ target = M._serve_child, args = { server_spec(self, address), w },
                        daemon = true, name = self._name, start_method = self._method }
  local ok, err = pcall(p.start, p)
  w:close()
  local msg, why
  if ok then msg, why = r:recv(60) end
  r:close()
  if not (ok and type(msg) == "table" and msg[1]) then
    if ok then
      if p:join(0) == nil then p:kill() end
      p:join(5)
    end
    if self._dir then os.remove(self._dir); self._dir = nil end
    local reason = not ok and tostring(err) or type(msg) == "table" and msg[2]
                   or ("no word from the server: " .. tostring(why))
    error(errors.new("ProcessError", "the manager's server did not start: " .. reason), 2)
  end
  self.address = msg[2]
  self._process = p
  self._owner = getpid()
  self._state = "started"
  if log and log.enabled("INFO") then
    log.info("manager %s started (pid %d, %s)", self.address, p.pid,
             self._method or process._default_method())
  end
  return self
end

-- m:connect() -> m: use the server at address (another process's manager)
function Manager.connect(self)
  if self._state ~= "initial" then
    error(errors.new("ProcessError", "connect: the manager is " .. self._state), 2)
  end
  if not self._address then error("connect: the manager has no address", 2) end
  self.address = self._address
  call(self.address, key_of(self), 0, "info")      -- reachable, and the key is right
  self._state = "connected"
  return self
end

-- m:serve_forever(): this process serves until a client calls shutdown
function Manager.serve_forever(self)
  if self._state ~= "initial" then
    error(errors.new("ProcessError", "serve_forever: the manager is " .. self._state), 2)
  end
  if not self._address then error("serve_forever: the manager needs an address", 2) end
  local srv = require("multiprocessing.managers.server").new(server_spec(self, self._address))
  self.address = srv.address
  self._state = "serving"
  local ok, err = pcall(srv.serve, srv)
  self._state = "shutdown"
  if not ok then pcall(srv.close, srv); error(err, 0) end
end

-- m:info() -> {objects=, clients=, parked=, pending=, refused=}, server pid
function Manager.info(self)
  check_running(self, "info")
  return call(self.address, self._authkey, 0, "info")
end

local function cleanup(self)
  local dir = self._dir
  if dir then
    os.remove(dir .. "/manager.sock")
    os.remove(dir)
    self._dir = nil
  end
end

-- m:shutdown(): stop the server this process started and reap it; waits
-- at most a few seconds, then kills it. Does nothing on a manager that is
-- not started here or already shut down.
function Manager.shutdown(self)
  if self._state ~= "started" or self._owner ~= getpid() then return end
  self._state = "shutdown"
  local p, addr, key = self._process, self.address, self._authkey
  if p:is_alive() then pcall(call, addr, key, 0, "shutdown") end
  forget(addr .. "\0" .. key)
  if p:join(5) == nil then
    p:kill()
    p:join(5)
  end
  if log and log.enabled("INFO") then
    log.info("manager %s stopped (exit code %s)", tostring(addr), tostring(p.exitcode))
  end
  pcall(p.close, p)
  cleanup(self)
end

-- __gc: no round trip, no wait on a live server: SIGKILL, then reap
local function collect(self)
  if rawget(self, "_state") ~= "started" or self._owner ~= getpid() then return end
  self._state = "shutdown"
  local p = self._process
  pcall(function()
    if p:join(0) == nil then p:kill() p:join(2) end
    p:close()
  end)
  forget(self.address .. "\0" .. self._authkey)
  cleanup(self)
end

MMT.__name = "multiprocessing.Manager"
MMT.__index = function(self, k)
  local f = Manager[k]
  if f ~= nil then return f end
  if type(k) == "string" and rawget(self, "_registry")[k] then
    local c = creators[k]
    if not c then c = creator(k); creators[k] = c end
    return c
  end
end
MMT.__close = function(self) self:shutdown() end
MMT.__gc = collect
MMT.__tostring = function(self)
  return "<" .. self._kind .. "(" .. tostring(self.address or self._address or "no address")
         .. ", " .. self._state .. ")>"
end
-- A manager travels as a client of the same server (its typeids, not its
-- callables): the receiver can make objects, not start or shut it down.
MMT.__mp_reduce = function(self)
  if self._state ~= "started" and self._state ~= "connected" then
    error(errors.new("SerializationError", "a manager that is not running cannot travel"), 0)
  end
  local ids = {}
  for t in pairs(self._registry) do ids[#ids + 1] = t end
  return "Manager", { addr = self.address, key = self._authkey, kind = self._kind, typeids = ids }
end
core.register_handle("Manager", function(st)
  if type(st) ~= "table" or type(st.addr) ~= "string" or type(st.key) ~= "string"
     or type(st.typeids) ~= "table" or type(st.kind) ~= "string" then
    error(errors.new("SerializationError", "malformed manager"), 0)
  end
  local m = new_manager({ address = st.addr, authkey = st.key }, st.kind)
  for _, t in ipairs(st.typeids) do
    if type(t) == "string" then m._registry[t] = {} end
  end
  m.address = st.addr
  m._state = "connected"
  return m
end)

return M
