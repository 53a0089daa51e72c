-- multiprocessing.managers.server: the manager's server, one event loop.
--
-- One process, one thread, one Lua state: the loop polls (core.poll, on a
-- list of fds rebuilt only when a client comes or goes) the Listener, the
-- handshakes it has pending and every authenticated connection, with the
-- nearest deadline of a parked call as its timeout.
-- A readable connection gives one request, {seq, oid, method, args...},
-- which runs at once against the object (managers/objects.lua, sync.lua) and is
-- answered {seq, true, results...} or {seq, false, error data}; a call that
-- must wait (a get on an empty queue, an acquire of a held lock) is parked
-- and answered when the object can grant it or its deadline passes. No
-- client can hold the loop: requests are read with timeout 0 (conn.c keeps
-- a message that is not all there), handshakes run as coroutines inside
-- accept(0) (connection.lua: at most HANDSHAKE_PENDING pending, each
-- bounded by HANDSHAKE_TIMEOUT, messages of at most HANDSHAKE_MAX bytes).
-- A connection that drops has its parked calls withdrawn and what it held
-- (locks, semaphores) released: sync.release_dropped.
--
-- Reference counting (docs/managers.md, "Object lifetime"): each object
-- counts its references (o.refs): those of each connection (cl.refs[oid],
-- given back by a request's rel list or when the connection drops),
-- transit ones (o.transit: a proxy on its way, taken by its sender and
-- adopted by its receiver) and those of proxies that live in this server
-- (stored in a dict, a queue...: proxies.lua marks them st.inner, their
-- __gc queues the id in srv.freeq, which the loop empties). An object
-- whose count falls to 0 leaves srv.objects; Lua's GC does the rest.

local core = require "multiprocessing.core"
local connection = require "multiprocessing.connection"
local errors = require "multiprocessing.errors"
local objects = require "multiprocessing.managers.objects"
local sync = require "multiprocessing.managers.sync"

local proxies = require "multiprocessing.managers.proxies"

local type, pairs, ipairs, pcall, xpcall, error, tostring, setmetatable, require, next =
      type, pairs, ipairs, pcall, xpcall, error, tostring, setmetatable, require, next
local collectgarbage = collectgarbage
local pack, unpack = table.pack, table.unpack
local mathtype = math.type
local monotonic, getpid = core.monotonic, core.getpid
local traceback = debug.traceback
local kinds = objects.kinds
local client = require "multiprocessing.managers.client"
local may_spin = client.may_spin

local M = {}
local Server = {}
Server.__index = Server
local PARK = setmetatable({}, { __tostring = function() return "PARK" end })
Server.PARK = PARK
M.ACCEPT_BURST = 64        -- handshakes advanced per loop turn, at most

-- The typeids of a SyncManager: typeid -> constructor(srv, ...) -> object
local BUILTIN = {
  dict = function(_, t) return objects.new_dict(t) end,
  list = function(_, t) return objects.new_list(t) end,
  Namespace = function(_, t) return objects.new_namespace(t) end,
  Queue = function(_, n) return sync.new_queue(n, false) end,
  JoinableQueue = function(_, n) return sync.new_queue(n, true) end,
  Lock = function() return sync.new_lock(false) end,
  RLock = function() return sync.new_lock(true) end,
  Semaphore = function(_, n) return sync.new_semaphore(n, false) end,
  BoundedSemaphore = function(_, n) return sync.new_semaphore(n, true) end,
  Condition = function(srv, l)
    local lo
    if l ~= nil then
      lo = srv:resolve(l)
      if not lo or (lo.kind ~= "Lock" and lo.kind ~= "RLock") then
        error("Condition: the lock must be a Lock or RLock of this manager", 0)
      end
    end
    return sync.new_condition(lo)
  end,
  Event = function() return sync.new_event() end,
  Barrier = function(_, parties, action, timeout)
    return sync.new_barrier(parties, action, timeout)
  end,
  Value = function(_, typ, init) return objects.new_value(typ, init) end,
  Array = function(_, typ, init) return objects.new_array(typ, init) end,
}
local SERVED = { dict = true, list = true, Namespace = true }

-- server.new{address=, authkey=, registry=} -> Server (listening); this
-- process's proxies of it are now its own (proxies.server)
function M.new(spec)
  local l = connection.exports.Listener(spec.address, { authkey = spec.authkey, backlog = 128 })
  local rnd = require("multiprocessing.auth").random_bytes(8)
  local srv = setmetatable({
    listener = l, address = l.address, authkey = spec.authkey,
    sid = rnd:gsub(".", function(ch) return ("%02x"):format(ch:byte()) end),
    registry = spec.registry or {},
    clients = {},      -- conn -> {parked = {w = true}, held = {obj = true}, refs = {oid = n}}
    objects = {},      -- oid -> object
    ids = {},          -- value a registered callable returned -> object
    nextid = 0,
    timed = {},        -- parked requests with a deadline
    freeq = {},        -- ids whose inner proxies were collected
    stopping = false,
    refused = 0,       -- peers that failed the handshake
  }, Server)
  proxies.server = srv
  return srv
end

-- ---- what objects.lua calls ---------------------------------------------

-- srv:hold(conn, obj, true | nil): conn holds obj (or no longer)
function Server:hold(conn, o, v)
  local cl = self.clients[conn]
  if cl then cl.held[o] = v end
end

-- srv:park(w, timeout, on_timeout) -> PARK: w waits; on_timeout() gives
-- its answer when timeout (nil: none) runs out
function Server:park(w, timeout, on_timeout)
  local cl = self.clients[w.conn]
  if cl then cl.parked[w] = true end
  w.on_timeout = on_timeout
  if timeout then
    local d = monotonic() + timeout
    w.deadline = d
    self.timed[#self.timed + 1] = w
    if not self.nextd or d < self.nextd then self.nextd = d end
  end
  return PARK
end

-- srv:unpark(w): w's deadline no longer counts (it was woken)
function Server:unpark(w) w.deadline = nil end

local function error_data(e)
  local err, tb = e, nil
  if type(e) == "table" and e.tb then err, tb = e.err, e.tb end
  local msg
  if errors.is_error(err) then
    msg = err.type .. ": " .. tostring(err.message)
    if err.traceback then tb = err.traceback .. "\n" .. (tb or "") end
  else
    msg = tostring(err)
  end
  return { type = "RemoteError", message = msg, traceback = tb, pid = getpid() }
end

-- ---- references -----------------------------------------------------------

local function unref(self, oid, n)
  local o = self.objects[oid]
  if not o then return end
  o.refs = o.refs - n
  if o.refs <= 0 then
    self.objects[oid] = nil
    local v = o.served
    if v ~= nil and self.ids[v] == o then self.ids[v] = nil end
  end
end

local function cl_unref(self, cl, oid)
  local n = cl.refs[oid]
  if not n then return end                -- not this connection's: ignored
  cl.refs[oid] = n > 1 and n - 1 or nil
  unref(self, oid, 1)
end

local function cl_ref(cl, o)
  o.refs = o.refs + 1
  cl.refs[o.id] = (cl.refs[o.id] or 0) + 1
end

-- srv:ref_out(oid) -> "c" | "t" | nil: a proxy of this server being
-- serialized (proxies.lua): a reference for the client the answer being
-- encoded goes to, or else a transit one; nil if the object is gone
function Server:ref_out(oid)
  local o = self.objects[oid]
  if not o then return nil end
  local cl = self.enc_cl
  if cl then
    cl_ref(cl, o)
    local log = self.enc_log
    if not log then
      log = {}
      self.enc_log = log
    end
    log[#log + 1] = oid
    return "c"
  end
  o.refs = o.refs + 1
  o.transit = o.transit + 1
  return "t"
end

-- srv:ref_in(oid, transit) -> true if the object exists: a proxy of this
-- server rebuilt here holds a reference (adopting a transit one)
function Server:ref_in(oid, transit)
  local o = self.objects[oid]
  if not o then return false end
  if transit and o.transit > 0 then o.transit = o.transit - 1
  else o.refs = o.refs + 1 end
  return true
end

-- srv:unref_later(oid): an inner proxy's __gc (no work in a finalizer)
function Server:unref_later(oid)
  local q = self.freeq
  q[#q + 1] = oid
end

local function run_freeq(self)
  local q = self.freeq
  self.freeq = {}
  for i = 1, #q do unref(self, q[i], 1) end
end

-- srv:collect(): a full collection, until no inner proxy is left to free
-- (a freed container's proxies are found by the next one)
function Server:collect()
  for _ = 1, 32 do
    collectgarbage("collect")
    if self.freeq[1] == nil then return end
    run_freeq(self)
  end
end

-- a request's reference traffic: inc (the proxy making the call takes a
-- reference for this connection), rel (ids whose references it gives back)
local function refs_msg(self, cl, oid, inc, rel)
  if inc then
    local o = self.objects[oid]
    if o then cl_ref(cl, o) end
  end
  if type(rel) == "table" then
    for i = 1, #rel do cl_unref(self, cl, rel[i]) end
  end
end

-- the references an answer that could not be sent gave its client
local function undo_refs(self)
  local cl, log = self.enc_cl, self.enc_log
  self.enc_log = nil
  if log then
    for i = 1, #log do cl_unref(self, cl, log[i]) end
  end
end

local function send_sock(self, conn, msg)
  local ok, sent = pcall(conn.send, conn, msg)
  if not ok then
    if core._is_interrupt(sent) then
      self.enc_cl, self.enc_log = nil, nil
      error(sent, 0)
    end
    if errors.is_error(sent) then          -- a result that cannot be serialized
      undo_refs(self)
      ok, sent = pcall(conn.send, conn, { msg[1], false, error_data(sent) })
    end
  end
  if not (ok and sent) then self:drop(conn) end
end

-- answer on the channel when the request came by it, else (or when the
-- answer holds a handle with fds, which a queue cannot carry) on the socket;
-- the proxies of this server in it take references for cl (ref_out)
local function send(self, w, msg)
  local conn = w.conn
  local cl = self.clients[conn]
  if not cl then return end
  self.enc_cl, self.enc_log = cl, nil
  if w.chan and cl.rep then
    local ok, err = pcall(cl.rep.put, cl.rep, msg)
    if ok then
      self.enc_cl, self.enc_log = nil, nil
      return
    end
    undo_refs(self)
    if core._is_interrupt(err) then self.enc_cl = nil; error(err, 0) end
    if not errors.is_error(err) then self.enc_cl = nil; return self:drop(conn) end
  end
  send_sock(self, conn, msg)
  self.enc_cl, self.enc_log = nil, nil
end

-- srv:grant(w, ...): answer w with results ...
function Server:grant(w, ...)
  w.done = true
  local cl = self.clients[w.conn]
  if not cl then return end
  cl.parked[w] = nil
  send(self, w, pack(w.seq, true, ...))
end

local function fail(self, w, e)
  w.done = true
  local cl = self.clients[w.conn]
  if not cl then return end
  cl.parked[w] = nil
  send(self, w, { w.seq, false, error_data(e) })
end

local function handler(e) return { err = e, tb = traceback(nil, 2) } end

-- srv:try(fn, ...) -> ok, ...: fn run with errors caught (a Barrier action)
function Server:try(fn, ...) return xpcall(fn, handler, ...) end

local function finish(self, w, ok, first, ...)
  if not ok then return fail(self, w, first) end
  if first == PARK then return end
  self:grant(w, first, ...)
end

-- ---- the server's own calls (oid 0) -------------------------------------

-- the object a proxy of this manager names, or nil
function Server:resolve(p)
  local st = proxies.state(p)
  if st and (st.sid == self.sid or st.sid == nil and st.addr == self.address) then
    return self.objects[st.oid]
  end
  return nil
end

local function add(self, o)
  self.nextid = self.nextid + 1
  o.id = self.nextid
  o.refs, o.transit = 0, 0
  self.objects[o.id] = o
  return o
end

-- the object that serves value v as typeid (registry entry e; nil for a
-- dict, list or Namespace that a method_to_typeid names in a BaseManager):
-- the one made before for the same value, or a new one
local function serve_value(self, typeid, e, v)
  local old = self.ids[v]
  if old then return old end
  local o
  local kind = typeid
  if e then kind = e.proxytype or e.builtin or "custom" end
  if SERVED[kind] then
    if type(v) ~= "table" then
      error("typeid '" .. typeid .. "': a " .. kind .. " proxy needs a table, got "
            .. type(v), 0)
    end
    o = add(self, { kind = kind, t = v, served = v })
  elseif kind ~= "custom" then
    error("typeid '" .. typeid .. "' cannot serve a value", 0)
  else
    local exposed = e.exposed or objects.exposed_of(v)
    local set = {}
    for _, name in ipairs(exposed) do set[name] = true end
    o = add(self, { kind = "custom", obj = v, served = v, exposed = exposed, exposed_set = set,
                    m2t = e.method_to_typeid })
  end
  self.ids[v] = o
  return o
end

local own = {}
-- create(typeid, ...) -> oid, kind, exposed, sid; the object gets one
-- reference, the calling connection's
function own.create(self, _, w, typeid, ...)
  local e = self.registry[typeid]
  if e == nil then error("unknown typeid " .. tostring(typeid), 0) end
  local o
  if e.builtin then
    o = add(self, BUILTIN[e.builtin](self, ...))
  else
    local v = e.callable(...)
    if v == nil then error("the callable of typeid '" .. typeid .. "' returned nil", 0) end
    o = serve_value(self, typeid, e, v)
  end
  cl_ref(self.clients[w.conn], o)
  return o.id, o.kind, o.exposed, self.sid
end

-- a method_to_typeid method's result: a proxy (of this server, st.inner)
-- of the object that serves it as typeid; its answer gives the caller a
-- reference (ref_out), and this proxy's own goes with it (collected)
local function as_proxy(self, typeid, v)
  if v == nil then return nil end
  local o = serve_value(self, typeid, self.registry[typeid], v)
  local st = { addr = self.address, key = self.authkey, oid = o.id, kind = o.kind,
               exposed = o.exposed, sid = self.sid }
  self:ref_in(o.id, false)
  st.inner = self
  return proxies.new(st)
end

-- transit(oid) -> true: a transit reference for a proxy being serialized
-- by its holder (false: no such object)
function own.transit(self, _, _, oid)
  local o = self.objects[oid]
  if not o then return false end
  o.refs = o.refs + 1
  o.transit = o.transit + 1
  return true
end

-- adopt(oid) -> true: the receiver of such a proxy makes a transit
-- reference its connection's (false: no such object)
function own.adopt(self, _, w, oid)
  local o = self.objects[oid]
  if not o then return false end
  local cl = self.clients[w.conn]
  if o.transit > 0 then
    o.transit = o.transit - 1
    o.refs = o.refs - 1
  end
  cl_ref(cl, o)
  return true
end

-- number_of_objects() -> n: the objects alive, after a full collection
function own.number_of_objects(self)
  self:collect()
  local n = 0
  for _ in pairs(self.objects) do n = n + 1 end
  return n
end

-- debug_info() -> {{id=, kind=, refs=, transit=, parked=}, ...} (by id),
-- after a full collection; parked: the entries of a sync object's or
-- queue's waiter lists (live or timed out, not yet dropped)
local WAIT_LISTS = { "waiters", "getters", "putters", "joiners", "waiting" }
function own.debug_info(self)
  self:collect()
  local r = {}
  for id, o in pairs(self.objects) do
    local parked = 0
    if type(o) == "table" then
      for _, k in ipairs(WAIT_LISTS) do
        if type(rawget(o, k)) == "table" then parked = parked + #o[k] end
      end
    end
    r[#r + 1] = { id = id, kind = o.kind, refs = o.refs, transit = o.transit, parked = parked }
  end
  table.sort(r, function(a, b) return a.id < b.id end)
  return r
end

-- channel() -> req, rep: two queues for this client's calls (managers.lua)
function own.channel(self, _, w)
  local cl = self.clients[w.conn]
  if not cl.req then
    local mp = require "multiprocessing"
    cl.req, cl.rep = mp.Queue(), mp.Queue()
    self.dirty = true
  end
  return cl.req, cl.rep
end

function own.shutdown(self)
  self.stopping = true
  return true
end

-- info() -> {objects=, clients=, parked=, pending=, refused=}, pid
function own.info(self)
  local n, c, parked = 0, 0, 0
  for _ in pairs(self.objects) do n = n + 1 end
  for _, cl in pairs(self.clients) do
    c = c + 1
    for _ in pairs(cl.parked) do parked = parked + 1 end
  end
  local hs = self.listener:_handshakes()
  return { objects = n, clients = c, parked = parked, pending = #hs, refused = self.refused },
         getpid()
end

local function custom_method(name)
  return function(self, o, _, ...)
    if not o.exposed_set[name] then
      error("'" .. tostring(name) .. "' is not exposed by this object", 0)
    end
    local m2t = o.m2t
    local typeid = m2t and m2t[name]
    if typeid then return as_proxy(self, typeid, (objects.custom_call(o, name, ...))) end
    return objects.custom_call(o, name, ...)
  end
end

-- ---- the loop -----------------------------------------------------------

function Server:dispatch(conn, msg, chan)
  if type(msg) ~= "table" then
    return fail(self, { conn = conn, seq = 0, chan = chan }, "malformed request")
  end
  local seq, oid, method = msg[1], msg[2], msg[3]
  local w = { conn = conn, seq = seq, chan = chan }
  local inc, rel = msg.inc, msg.rel
  if inc or rel then refs_msg(self, self.clients[conn], oid, inc, rel) end
  if mathtype(seq) == "integer" and seq < 0 then self.peer_spins = true end
  local fn, o
  if oid == 0 then
    fn, o = own[method], self
  else
    o = self.objects[oid]
    if o == nil then
      return fail(self, w, "no object " .. tostring(oid) .. " in this manager")
    end
    if o.kind == "custom" then fn = custom_method(method)
    else fn = kinds[o.kind][method] end
  end
  if type(fn) ~= "function" then
    return fail(self, w, "no method '" .. tostring(method) .. "' here")
  end
  finish(self, w, xpcall(fn, handler, self, o, w, unpack(msg, 4, msg.n or #msg)))
end

local function close_channel(cl)
  for _, q in ipairs({ cl.req, cl.rep }) do
    pcall(q.cancel_join_thread, q)      -- nobody may read what waits in it
    pcall(q.close, q)
  end
  cl.req, cl.rep = nil, nil
end

function Server:drop(conn)
  local cl = self.clients[conn]
  if not cl then return end
  self.clients[conn] = nil
  self.dirty = true
  conn:close()
  for w in pairs(cl.parked) do w.done = true end
  local log = next(cl.held) and client.log
  if log and log.enabled("WARN") then
    local n = 0
    for _ in pairs(cl.held) do n = n + 1 end
    log.warn("manager %s: a client left holding %d lock(s) or semaphore(s); released",
             self.address, n)
  end
  for o in pairs(cl.held) do sync.release_dropped(self, o, conn) end
  close_channel(cl)
  for oid, n in pairs(cl.refs) do unref(self, oid, n) end   -- its proxies' references
end

function Server:on_readable(conn)
  local ok, msg, why = pcall(conn.recv, conn, 0)
  if not ok then
    if core._is_interrupt(msg) then error(msg, 0) end
    return fail(self, { conn = conn, seq = 0 }, msg)      -- undecodable
  end
  if msg == nil then
    if why ~= "timeout" then self:drop(conn) end
    return
  end
  self:dispatch(conn, msg)
  -- more messages already read into conn's buffer: poll will not see them
  if self.clients[conn] and conn:_buffered() then
    self.again = self.again or {}
    self.again[conn] = true
  end
end

-- requests that came on conn's channel (a few: the others next turn)
function Server:on_channel(conn)
  for _ = 1, 16 do
    local cl = self.clients[conn]
    local req = cl and cl.req
    if not req then return end
    local ok, msg = pcall(req.get, req, 0)
    if not ok then
      if core._is_interrupt(msg) then error(msg, 0) end
      -- an item that cannot be decoded: say so on the socket; a queue
      -- whose shared state is corrupt: this client is dropped
      if errors.is_error(msg) and msg.type == "SerializationError" then
        return fail(self, { conn = conn, seq = 0 }, msg)
      end
      return self:drop(conn)
    end
    if msg == nil then return end
    self:dispatch(conn, msg, true)
  end
end

function Server:accept_all()
  self.dirty = true                -- new clients, pending handshakes
  for _ = 1, M.ACCEPT_BURST do
    local ok, c, why = pcall(self.listener.accept, self.listener, 0)
    if not ok then
      if core._is_interrupt(c) then error(c, 0) end
      self.refused = self.refused + 1        -- a peer without the key: next
      local log = client.log
      if log and log.enabled("WARN") then
        log.warn("manager %s refused a peer: %s", self.address, tostring(c))
      end
    elseif c then
      self.clients[c] = { parked = {}, held = {}, refs = {} }
      if c:_buffered() then            -- its first request came with the handshake
        self.again = self.again or {}
        self.again[c] = true
      end
    elseif why == "timeout" then
      return
    else
      return                                 -- accept failed (EMFILE...): later
    end
  end
end

-- answer the parked requests whose deadline passed; -> the next deadline.
-- The list is scanned only once the earliest deadline known (self.nextd,
-- lowered by park; a woken request's may make it early, never late) has
-- come, not at every turn of the loop.
function Server:expire()
  local timed = self.timed
  if timed[1] == nil then self.nextd = nil return nil end
  local now, nextd = monotonic(), self.nextd
  if nextd and now < nextd then return nextd end
  local keep = {}
  nextd = nil
  self.timed = keep
  for _, w in ipairs(timed) do
    local d = w.deadline
    if not w.done and d then
      if d <= now then
        w.deadline = nil
        w.done = true
        finish(self, w, xpcall(w.on_timeout, handler))
      else
        keep[#keep + 1] = w
        if not nextd or d < nextd then nextd = d end
      end
    end
  end
  -- on_timeout may have parked again (a Condition's wait takes its lock back)
  for _, w in ipairs(self.timed) do
    local d = w.deadline
    if d and not w.done and (not nextd or d < nextd) then nextd = d end
  end
  self.nextd = nextd
  return nextd
end

-- Spinning: a client that spins for its answer (it sends its seq
-- negated, managers/client.lua) usually sends its next request within
-- microseconds of that answer, and a process woken from poll costs tens of
-- them on a busy or virtual machine, so after answering one the loop polls
-- without sleeping for up to SPIN seconds before it sleeps, when the
-- machine has CPUs to spare (client.may_spin). After FAILS spins in a
-- row caught nothing it sleeps at once, and tries a spin again every 16th
-- turn.
M.SPIN, M.FAILS = 50e-6, 2

-- the fds to poll: the listener, each client, each pending handshake
local function fdlist(self)
  local fds, conns, chans = { self.listener:fileno() }, {}, {}
  for c, cl in pairs(self.clients) do
    fds[#fds + 1] = c:fileno()
    conns[#fds] = c
    if cl.req then
      fds[#fds + 1] = cl.req:fileno()      -- readable while it holds a request
      chans[#fds] = c
    end
  end
  local hfds, hdl = self.listener:_handshakes()
  local n = #fds
  for i = 1, #hfds do fds[n + i] = hfds[i] end
  self.fds, self.fdconns, self.fdchans, self.hdl, self.nhs = fds, conns, chans, hdl, #hfds
  self.dirty = false
end

-- srv:serve(): until a client calls shutdown
function Server:serve()
  local poll = core.poll
  local nextd, fails, probe = nil, 0, 0
  self.dirty = true
  while not self.stopping do
    if self.freeq[1] ~= nil then run_freeq(self) end
    if self.dirty or self.nhs > 0 then fdlist(self) end
    local fds, conns, chans, hdl = self.fds, self.fdconns, self.fdchans, self.hdl
    local d = nextd
    if hdl and (not d or hdl < d) then d = hdl end
    local hits
    local peer_spins = self.peer_spins
    self.peer_spins = false
    if self.again then
      hits = poll(fds, 0)                    -- buffered requests wait: no sleep
    else
      probe = probe + 1
      if peer_spins and (fails < M.FAILS or probe & 15 == 0) and may_spin() then
        local t0, budget = monotonic(), M.SPIN
        repeat
          hits = poll(fds, 0)
        until #hits > 0 or monotonic() - t0 > budget
        fails = #hits > 0 and 0 or fails + 1
      end
      if not hits or #hits == 0 then
        local timeout = nil
        if d then
          timeout = d - monotonic()
          if timeout < 0 then timeout = 0 end
        end
        hits = poll(fds, timeout)
      end
    end
    local again = self.again
    self.again = nil
    if again then
      for c in pairs(again) do if self.clients[c] then self:on_readable(c) end end
    end
    local accept = false
    for _, i in ipairs(hits) do
      local c = conns[i]
      if c then
        if self.clients[c] and not (again and again[c]) then self:on_readable(c) end
      elseif chans[i] then
        if self.clients[chans[i]] then self:on_channel(chans[i]) end
      else
        accept = true
      end
    end
    if accept or (hdl and monotonic() >= hdl) then self:accept_all() end
    nextd = self:expire()
  end
  self:close()
end

function Server:close()
  for c, cl in pairs(self.clients) do
    self.clients[c] = nil
    c:close()
    close_channel(cl)
  end
  self.listener:close()
  if proxies.server == self then proxies.server = nil end
end

return M
