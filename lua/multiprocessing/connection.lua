-- multiprocessing.connection: Pipe, Connection (csrc/conn.c) and wait.
--
-- mp.wait watches connections, process sentinels, raw fds and any object
-- that has fileno() (queues, pools, AsyncResults); an object may also have
-- _ready() to confirm that a read would not block, for fds that can wake
-- spuriously, and timeout() (the polling protocol's) to be looked at again
-- after that many seconds although its fd stayed quiet.
--
-- Connections and Listeners speak cqueues' polling protocol (pollfd,
-- events, timeout; docs/eventloops.md), as do the other waitables.

local core = require "multiprocessing.core"
local errors = require "multiprocessing.errors"
local check = require "multiprocessing.check"
local CLASSES = core.classes      -- the C classes' metatable names, by short name
local polling = require "multiprocessing.polling"

local type, ipairs, error, tostring, tonumber, setmetatable =
      type, ipairs, error, tostring, tonumber, setmetatable
local argerror = check.argerror
local mathtype = math.type
local create, resume, status, yield =
      coroutine.create, coroutine.resume, coroutine.status, coroutine.yield
local monotonic, poll, fd_is_open = core.monotonic, core.poll, core._fd_is_open

local M = {}
local exports = {}
M.exports = exports

-- mp.Pipe([duplex=true]) -> c1, c2 (duplex=false: c1 receives, c2 sends)
function exports.Pipe(duplex)
  check.type(duplex, "boolean", 1, "Pipe")
  return core.Pipe(duplex)
end

local BLIND_SLICE = 0.02
local function ended(p) return not p:is_alive() end

-- What to poll for object o: its fd, whether it is ready already, and for
-- objects whose fd can wake spuriously the method that confirms it. A
-- process that has no fd to poll (no pidfd: an old kernel, or valgrind)
-- gets fd -1 and is confirmed every BLIND_SLICE seconds instead.
local function fd_of(o, i, seen)
  local t = type(o)
  if t == "number" then
    if mathtype(o) ~= "integer" or not fd_is_open(o) then
      argerror(1, "wait", "objects[" .. i .. "] is not an open file descriptor: "
               .. tostring(o), 3)
    end
    return o
  end
  local cls = check.typename(o)
  if cls == CLASSES.Connection then
    return o:fileno(), o:_buffered()
  elseif cls == CLASSES.Process then
    local s = o.sentinel
    if s then return s end
    if o._state == "started" then return -1, ended(o), ended end
    argerror(1, "wait", "objects[" .. i .. "] is a process that is not started or is closed", 3)
  elseif (t == "table" or t == "userdata") and o.fileno then
    local confirm = o._ready
    if confirm and confirm(o, seen) then return -1, true end   -- (a finished
    -- AsyncResult of a terminated pool has no fd any more)
    local tick = o.timeout
    return o:fileno(), false, confirm, type(tick) == "function" and tick or nil
  end
  argerror(1, "wait", "objects[" .. i .. "] is not waitable: " .. tostring(o), 3)
end

-- mp.wait(objects [, timeout]) -> list of the objects ready to read or
-- finished; an empty list on timeout
function exports.wait(objects, timeout)
  if type(objects) ~= "table" then
    argerror(1, "wait", "table expected, got " .. check.typename(objects))
  end
  check.timeout(timeout, 2, "wait")
  local fds, confirms, ready, blind, ticking, tick = {}, {}, {}, {}, {}, {}
  -- seen: per round, the pools whose news were taken in already (every
  -- AsyncResult of a pool confirms through one step of it, not one each)
  local seen = {}
  for i, o in ipairs(objects) do
    local fd, now, confirm, timeout_of = fd_of(o, i, seen)
    fds[i], confirms[i] = fd, confirm or false
    if now then ready[#ready + 1] = o end
    if fd < 0 and confirm then blind[#blind + 1] = i end
    if timeout_of then ticking[#ticking + 1] = i; tick[i] = timeout_of end
  end
  if #ready > 0 then return ready end
  local deadline = timeout and monotonic() + timeout
  local due = {}
  while true do
    local left = deadline and deadline - monotonic()
    if left and left < 0 then left = 0 end
    if #blind > 0 and (not left or left > BLIND_SLICE) then left = BLIND_SLICE end
    for k = 1, #ticking do                -- objects that asked to be tried in t s
      local i = ticking[k]
      local t = tick[i](objects[i])
      due[i] = t
      if t and (not left or t < left) then left = t end
    end
    local hits = poll(fds, left)
    local hit = {}
    seen = {}
    for _, i in ipairs(hits) do
      local o, confirm = objects[i], confirms[i]
      hit[i] = true
      if not confirm or confirm(o, seen) then ready[#ready + 1] = o end
    end
    for _, i in ipairs(blind) do
      if confirms[i](objects[i], seen) then ready[#ready + 1] = objects[i] end
    end
    local tried = false
    for k = 1, #ticking do                -- their time came: try now
      local i = ticking[k]
      if due[i] and due[i] <= left and not hit[i] then
        tried = true
        local confirm = confirms[i]
        if not confirm or confirm(objects[i], seen) then ready[#ready + 1] = objects[i] end
      end
    end
    if #ready > 0 or (#hits == 0 and #blind == 0 and not tried) then return ready end
    if deadline and monotonic() >= deadline then return ready end
  end
end

-- ---- the polling protocol ---------------------------------------------------
--
-- cqueues.poll(obj) asks obj:pollfd(), obj:events() and obj:timeout();
-- luv's uv.new_poll takes obj:fileno(). Readable means "try now": the call
-- with timeout 0 may still find nothing (docs/eventloops.md).

local events = polling.events
local Cmethods = core.Connection_methods
Cmethods.pollfd, Cmethods.events = polling.pollfd_method(Cmethods.fileno), events
polling.cancel_on_close(Cmethods, CLASSES.Connection)
-- a message already in the read buffer (or the end of the stream) is not
-- seen by a poll of the fd: try now
function Cmethods.timeout(c) if c:_buffered() then return 0 end end

-- ---- Listener and Client -------------------------------------------------
--
-- An address is "host:port" (TCP; "[::1]:port" for IPv6; port 0 picks a
-- free one) or anything else, a Unix socket path. With an authkey, both
-- sides prove they know it before anything is decoded: each sends the other
-- a random challenge and checks the HMAC-SHA256 of it (as Python does).
-- A connection whose peer has not proved a key is untrusted: it never loads
-- functions (bytecode) from it nor rebuilds handles (their fds: memory the
-- peer could truncate), and handshake messages are size-bounded.
--
-- A Listener with an authkey runs its handshakes side by side inside
-- accept, so that a peer that connects and says nothing cannot hold up the
-- next one: each accepted connection gets a coroutine that yields whenever
-- the peer's next message is not all there (conn.c keeps what came), and
-- accept polls the listening socket and every pending connection. At most
-- HANDSHAKE_PENDING handshakes are pending per Listener (a new connection
-- drops the oldest), each for HANDSHAKE_TIMEOUT seconds from its accept;
-- one that runs out of time is closed without a word (its peer proved
-- nothing), one that fails raises AuthenticationError from accept. The
-- server's handshake messages are tiny and go to a fresh socket buffer, so
-- its sends never block. The Client blocks in its own handshake, bounded by
-- HANDSHAKE_TIMEOUT.

local CHALLENGE, WELCOME, FAILURE = "#CHALLENGE#", "#WELCOME#", "#FAILURE#"
local HANDSHAKE_MAX = 256
M.HANDSHAKE_TIMEOUT = 30     -- in M, read at each use: a spec may shorten it
M.HANDSHAKE_PENDING = 64
-- the crypto (csrc/auth.c, libcrypto) is loaded on the first handshake:
-- a process that runs none does not pay for loading libcrypto
local auth
local function crypto()
  auth = auth or require "multiprocessing.auth"
  return auth
end
local pcall, remove = pcall, table.remove

-- (the levels: as error() in parse_address and check_opts, whose callers
-- are the public functions)
local function parse_address(address, fname)
  if type(address) ~= "string" or address == "" then
    argerror(1, fname, "address string expected, got " ..
             (address == "" and "empty string" or check.typename(address)), 3)
  end
  local host, port = address:match("^(.*):(%d+)$")
  if host then
    if tonumber(port) > 65535 then
      argerror(1, fname, "port " .. port .. " out of range 0..65535", 3)
    end
    host = host:match("^%[(.*)%]$") or host
    return host, port
  end
  return address
end

local function check_opts(opts, fname, allowed)
  opts = check.options(opts, 2, fname, allowed, 3)
  if opts.authkey == "" then argerror(2, fname, "'authkey' must be a non-empty string", 3) end
  if allowed.backlog then
    return opts, check.integer(opts.backlog, 2, fname, "'backlog'", 1, nil, 3)
  end
  return opts
end

-- A handshake receives with recv(c) -> the peer's next message, or nil when
-- none came (closed, timed out, too long, corrupt). The Client waits for it;
-- the Listener's coroutines yield until it is all there. A signal's error
-- (lua5.4's Ctrl-C in the Client's wait) goes on.
local function recv_waiting(c)
  local ok, msg = pcall(c._recv_bytes_max, c, M.HANDSHAKE_TIMEOUT, HANDSHAKE_MAX)
  if ok then return msg end
  if core._is_interrupt(msg) then error(msg, 0) end
  return nil
end

local function recv_yielding(c)
  while true do
    local ok, msg, why = pcall(c._recv_bytes_max, c, 0, HANDSHAKE_MAX)
    if not ok then return nil end
    if msg or why ~= "timeout" then return msg end
    yield()
  end
end

local function deliver_challenge(c, key, recv)
  local a = crypto()
  local msg = CHALLENGE .. a.random_bytes(32)
  c:send_bytes(msg)
  local answer = recv(c)
  if answer and a.equal_digest(answer, a.hmac_sha256(key, msg)) then
    c:send_bytes(WELCOME)
    return true
  end
  if not c.closed then c:send_bytes(FAILURE) end
  return false, answer and "digest received was wrong" or "no answer to the challenge"
end

local function answer_challenge(c, key, recv)
  local msg = recv(c)
  if not msg or msg:sub(1, #CHALLENGE) ~= CHALLENGE then
    return false, "the peer sent no challenge (does it use an authkey?)"
  end
  c:send_bytes(crypto().hmac_sha256(key, msg))
  if recv(c) ~= WELCOME then return false, "digest sent was rejected" end
  return true
end

-- The Listener's side, run in a coroutine: -> true | false, why
local function server_handshake(c, key)
  local ok, why = deliver_challenge(c, key, recv_yielding)
  if ok then ok, why = answer_challenge(c, key, recv_yielding) end
  return ok, why
end

local authkeys = setmetatable({}, { __mode = "k" })
-- per Listener, its pending handshakes, oldest first: {c=, co=, deadline=}
local pendings = setmetatable({}, { __mode = "k" })
local Lmethods, Lmt = core.Listener_methods, core.Listener_mt

-- mp.Listener(address [, {authkey=s, backlog=n}]) -> Listener
function exports.Listener(address, opts)
  local host, port = parse_address(address, "Listener")
  local backlog
  opts, backlog = check_opts(opts, "Listener", { authkey = "string", backlog = true })
  local l = core.listen(host, port, backlog)
  if opts.authkey then
    authkeys[l] = opts.authkey
    pendings[l] = {}
  end
  return l
end

local function forget(list, h)
  for i = 1, #list do
    if list[i] == h then remove(list, i) break end
  end
  h.gone = true
end

-- Run h's handshake as far as what has come allows: its connection when it
-- is done (now trusted), nothing while it waits; raises AuthenticationError
-- when it failed.
local function advance(list, h, key)
  local ok, done, why = resume(h.co, h.c, key)
  if ok and status(h.co) == "suspended" then return nil end
  forget(list, h)
  if ok and done then
    h.c:_set_trusted(true)
    return h.c
  end
  h.c:close()
  if not ok then error(done, 0) end       -- a bug in the handshake itself
  errors.raise("AuthenticationError", why, 0)
end

-- l:accept([timeout]) -> Connection | nil, "timeout"; raises
-- AuthenticationError when a peer fails to prove the authkey (the other
-- pending handshakes stay for the next accept)
function Lmethods.accept(self, timeout)
  check.timeout(timeout, 1, "accept")
  local key = authkeys[self]
  if not key then return self:_accept(timeout) end
  local lfd, list = self:fileno(), pendings[self]
  local deadline = timeout and monotonic() + timeout
  while true do
    local now, wake = monotonic(), deadline
    for i = #list, 1, -1 do
      local h = list[i]
      if h.deadline <= now then
        remove(list, i)
        h.gone = true
        h.c:close()
      elseif not wake or h.deadline < wake then
        wake = h.deadline
      end
    end
    local fds, polled = { lfd }, {}
    for i, h in ipairs(list) do fds[i + 1], polled[i + 1] = h.c:fileno(), h end
    local hits = poll(fds, wake and (wake > now and wake - now or 0))
    for _, i in ipairs(hits) do
      local h = polled[i]
      if i == 1 then                      -- a new connection: challenge it
        local c, why, errno = self:_accept(0)
        if c then
          if #list >= M.HANDSHAKE_PENDING then
            local oldest = remove(list, 1)
            oldest.gone = true
            oldest.c:close()
          end
          h = { c = c, co = create(server_handshake),
                deadline = monotonic() + M.HANDSHAKE_TIMEOUT }
          list[#list + 1] = h
        elseif why ~= "timeout" then
          return nil, why, errno
        end
      end
      if h and not h.gone then
        local c = advance(list, h, key)
        if c then return c end
      end
    end
    if deadline and monotonic() >= deadline then return nil, "timeout" end
  end
end

-- l:_handshakes() -> list of the fds of the pending handshakes, and the
-- earliest of their deadlines (nil when none is pending). For an event loop
-- (the manager's server) that polls these beside its own connections and
-- calls accept(0) when one of them, or the listening socket, is readable or
-- a deadline has passed: accept(0) never blocks on a silent peer.
function Lmethods._handshakes(self)
  local list, fds, first = pendings[self], {}, nil
  if not list then return fds, nil end
  for i, h in ipairs(list) do
    fds[i] = h.c:fileno()
    if not first or h.deadline < first then first = h.deadline end
  end
  return fds, first
end

-- l:close(): closes the pending handshakes too; may be called twice
local c_close = Lmethods.close
function Lmethods.close(self)
  local list = pendings[self]
  if list then
    for i = #list, 1, -1 do list[i].c:close(); list[i] = nil end
  end
  c_close(self)
end
Lmt.__gc = Lmethods.close
Lmt.__close = Lmethods.close

-- The polling protocol: the listening socket. A keyed Listener's pending
-- handshakes advance only inside accept, and their peers' answers do not
-- make the listening socket readable: while some are pending, timeout()
-- asks to be tried again every HANDSHAKE_TICK seconds.
M.HANDSHAKE_TICK = 0.01
Lmethods.pollfd, Lmethods.events = polling.pollfd_method(Lmethods.fileno), events
polling.cancel_on_close(Lmethods, CLASSES.Listener)
function Lmethods.timeout(self)
  local list = pendings[self]
  if list and list[1] then return M.HANDSHAKE_TICK end
end

Lmt.__index = function(self, k)
  local m = Lmethods[k]
  if m ~= nil then return m end
  if k == "address" then
    if self:_closed() then return nil end
    local host, port = self:_address()
    if port then
      return (host:find(":", 1, true) and "[" .. host .. "]" or host) .. ":" .. port
    end
    return host
  elseif k == "closed" then
    return self:_closed()
  end
end
Lmt.__tostring = function(self)
  if self:_closed() then return "<Listener(closed)>" end
  return "<Listener(" .. self.address .. ")>"
end

-- mp.Client(address [, {authkey=s}]) -> Connection; raises
-- AuthenticationError when the keys differ
function exports.Client(address, opts)
  local host, port = parse_address(address, "Client")
  opts = check_opts(opts, "Client", { authkey = "string" })
  local c = core.connect(host, port)
  local key = opts.authkey
  if not key then return c end
  local ok, why = answer_challenge(c, key, recv_waiting)
  if ok then ok, why = deliver_challenge(c, key, recv_waiting) end
  if not ok then
    c:close()
    errors.raise("AuthenticationError", why, 2)
  end
  c:_set_trusted(true)
  return c
end

return M
