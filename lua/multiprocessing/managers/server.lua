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
-- The server's own calls and the objects it makes are builtins.lua's,
-- the reference counting of its objects refs.lua's (docs/managers.md,
-- "Object lifetime"); this file is the loop and the answers.

local core = require "multiprocessing.core"
local connection = require "multiprocessing.connection"
local errors = require "multiprocessing.errors"
local objects = require "multiprocessing.managers.objects"
local sync = require "multiprocessing.managers.sync"
local proxies = require "multiprocessing.managers.proxies"
local client = require "multiprocessing.managers.client"
local refs = require "multiprocessing.managers.refs"
local builtins = require "multiprocessing.managers.builtins"

local type, pairs, ipairs, pcall, xpcall, error, tostring =
      type, pairs, ipairs, pcall, xpcall, error, tostring
local pack, unpack = table.pack, table.unpack
local mathtype = math.type
local monotonic, getpid = core.monotonic, core.getpid
local traceback = debug.traceback
local kinds, own, custom = objects.kinds, builtins.own, builtins.custom
local may_spin = client.may_spin
local unref, run_freeq = refs.unref, refs.run_freeq
local refs_msg, undo_refs = refs.refs_msg, refs.undo_refs

local M = {}
local Server = {}
Server.__index = Server
for _, part in ipairs { refs, builtins } do
  for k, f in pairs(part.methods) do Server[k] = f end
end
local PARK = setmetatable({}, { __tostring = function() return "PARK" end })
Server.PARK = PARK
M.ACCEPT_BURST = 64        -- handshakes advanced per loop turn, at most

-- server.new{address=, authkey=, registry=} -> Server (listening); this
-- process's proxies of it are now its own (proxies.server)
function M.new(spec)
  local l = connection.exports.Listener(spec.address, { authkey = spec.authkey, backlog = 128 })
  local rnd = require("multiprocessing.auth").random_bytes(8)
  local srv = setmetatable({
    listener = l, address = l.address, authkey = spec.authkey,
    pid = core.getpid(), -- (proxies.lua: a forked child's copy is no server)
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
    sync.push_waiter(self.timed, w)     -- (the answered ones dropped now and then)
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
  local args = 4                         -- where msg's arguments start
  if oid == 0 then
    fn, o = own[method], self
  else
    o = self.objects[oid]
    if o == nil then
      return fail(self, w, "no object " .. tostring(oid) .. " in this manager")
    end
    if o.kind == "custom" then fn, args = custom, 3      -- custom(srv, o, w, method, ...)
    else fn = kinds[o.kind][method] end
  end
  if type(fn) ~= "function" then
    return fail(self, w, "no method '" .. tostring(method) .. "' here")
  end
  finish(self, w, xpcall(fn, handler, self, o, w, unpack(msg, args, msg.n or #msg)))
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
