-- multiprocessing.connection: Pipe, Connection (csrc/conn.c) and wait.
--
-- mp.wait watches connections, process sentinels, raw fds and any object
-- that has fileno() (queues); an object may also have _ready() to confirm
-- that a read would not block, for fds that can wake spuriously.

local core = require "multiprocessing.core"
local errors = require "multiprocessing.errors"

local type, ipairs, error, getmetatable, tostring =
      type, ipairs, error, getmetatable, tostring
local monotonic, poll = core.monotonic, core.poll

local M = {}
local exports = {}
M.exports = exports

-- mp.Pipe([duplex=true]) -> c1, c2 (duplex=false: c1 receives, c2 sends)
function exports.Pipe(duplex)
  if duplex ~= nil and type(duplex) ~= "boolean" then
    error("bad argument #1 to 'Pipe' (boolean expected, got " .. type(duplex) .. ")", 2)
  end
  return core.Pipe(duplex)
end

if core.register_handle then
  core.register_handle("Connection", function(state, fd)
    return core.conn_from_fd(fd, state[1], state[2])
  end)
end

local function classname(o)
  local mt = getmetatable(o)
  return type(mt) == "table" and mt.__name or nil
end

local BLIND_SLICE = 0.02
local function ended(p) return not p:is_alive() end

-- What to poll for object o: its fd, whether it is ready already, and for
-- objects whose fd can wake spuriously the method that confirms it. A
-- process that has no fd to poll (no pidfd: an old kernel, or valgrind)
-- gets fd -1 and is confirmed every BLIND_SLICE seconds instead.
local function fd_of(o, i)
  local t = type(o)
  if t == "number" then return o end
  local cls = classname(o)
  if cls == "multiprocessing.Connection" then
    return o:fileno(), o:_buffered()
  elseif cls == "multiprocessing.Process" then
    local s = o.sentinel
    if s then return s end
    if o._state == "started" then return -1, ended(o), ended end
    error("bad argument #1 to 'wait' (objects[" .. i ..
          "] is a process that is not started or is closed)", 3)
  elseif (t == "table" or t == "userdata") and o.fileno then
    local confirm = o._ready
    return o:fileno(), confirm and confirm(o), confirm
  end
  error("bad argument #1 to 'wait' (objects[" .. i .. "] is not waitable: " .. tostring(o) .. ")", 3)
end

-- mp.wait(objects [, timeout]) -> list of the objects ready to read or
-- finished; an empty list on timeout
function exports.wait(objects, timeout)
  if type(objects) ~= "table" then
    error("bad argument #1 to 'wait' (table expected, got " .. type(objects) .. ")", 2)
  end
  if timeout ~= nil and (type(timeout) ~= "number" or timeout < 0) then
    error("bad argument #2 to 'wait' (timeout must be a number >= 0)", 2)
  end
  local fds, confirms, ready, blind = {}, {}, {}, {}
  for i, o in ipairs(objects) do
    local fd, now, confirm = fd_of(o, i)
    fds[i], confirms[i] = fd, confirm or false
    if now then ready[#ready + 1] = o end
    if fd < 0 and confirm then blind[#blind + 1] = i end
  end
  if #ready > 0 then return ready end
  local deadline = timeout and monotonic() + timeout
  while true do
    local left = deadline and deadline - monotonic()
    if left and left < 0 then left = 0 end
    if #blind > 0 and (not left or left > BLIND_SLICE) then left = BLIND_SLICE end
    local hits = poll(fds, left)
    for _, i in ipairs(hits) do
      local o, confirm = objects[i], confirms[i]
      if not confirm or confirm(o) then ready[#ready + 1] = o end
    end
    for _, i in ipairs(blind) do
      if confirms[i](objects[i]) then ready[#ready + 1] = objects[i] end
    end
    if #ready > 0 or (#hits == 0 and #blind == 0) then return ready end
    if deadline and monotonic() >= deadline then return ready end
  end
end

-- ---- Listener and Client -------------------------------------------------
--
-- An address is "host:port" (TCP; "[::1]:port" for IPv6; port 0 picks a
-- free one) or anything else, a Unix socket path. With an authkey, both
-- sides prove they know it before anything is decoded: each sends the other
-- a random challenge and checks the HMAC-SHA256 of it (as Python does).
-- A connection whose peer has not proved a key is untrusted: it never loads
-- functions (bytecode) from it, and handshake messages are size-bounded.

local CHALLENGE, WELCOME, FAILURE = "#CHALLENGE#", "#WELCOME#", "#FAILURE#"
local HANDSHAKE_TIMEOUT, HANDSHAKE_MAX = 30, 256
local hmac, random_bytes, equal_digest = core.hmac_sha256, core.random_bytes, core.equal_digest
local pcall = pcall

local function parse_address(address, fname)
  if type(address) ~= "string" or address == "" then
    error("bad argument #1 to '" .. fname .. "' (address string expected, got " ..
          type(address) .. ")", 3)
  end
  local host, port = address:match("^(.*):(%d+)$")
  if host then
    host = host:match("^%[(.*)%]$") or host
    return host, port
  end
  return address
end

local function check_opts(opts, fname, allowed)
  if opts == nil then return {} end
  if type(opts) ~= "table" then
    error("bad argument #2 to '" .. fname .. "' (table expected, got " .. type(opts) .. ")", 3)
  end
  for k in pairs(opts) do
    if not allowed[k] then error(fname .. ": unknown option '" .. tostring(k) .. "'", 3) end
  end
  if opts.authkey ~= nil and (type(opts.authkey) ~= "string" or opts.authkey == "") then
    error(fname .. ": 'authkey' must be a non-empty string", 3)
  end
  if opts.backlog ~= nil and (math.type(opts.backlog) ~= "integer" or opts.backlog < 1) then
    error(fname .. ": 'backlog' must be a positive integer", 3)
  end
  return opts
end

-- A bad handshake message (too long, corrupt) is a failed handshake; a
-- signal's error (lua5.4's Ctrl-C in the wait) goes on.
local function recv_small(c)
  local ok, msg = pcall(c._recv_bytes_max, c, HANDSHAKE_TIMEOUT, HANDSHAKE_MAX)
  if ok then return msg end
  if core._is_interrupt(msg) then error(msg, 0) end
  return nil
end

local function deliver_challenge(c, key)
  local msg = CHALLENGE .. random_bytes(32)
  c:send_bytes(msg)
  local answer = recv_small(c)
  if answer and equal_digest(answer, hmac(key, msg)) then
    c:send_bytes(WELCOME)
    return true
  end
  if not c.closed then c:send_bytes(FAILURE) end
  return false, answer and "digest received was wrong" or "no answer to the challenge"
end

local function answer_challenge(c, key)
  local msg = recv_small(c)
  if not msg or msg:sub(1, #CHALLENGE) ~= CHALLENGE then
    return false, "the peer sent no challenge (does it use an authkey?)"
  end
  c:send_bytes(hmac(key, msg))
  if recv_small(c) ~= WELCOME then return false, "digest sent was rejected" end
  return true
end

local function authenticate(c, key, server)
  local ok, why
  if server then
    ok, why = deliver_challenge(c, key)
    if ok then ok, why = answer_challenge(c, key) end
  else
    ok, why = answer_challenge(c, key)
    if ok then ok, why = deliver_challenge(c, key) end
  end
  if not ok then
    c:close()
    error(errors.new("AuthenticationError", why), 3)
  end
  c:_set_trusted(true)
  return c
end

local authkeys = setmetatable({}, { __mode = "k" })
local Lmethods, Lmt = core.Listener_methods, core.Listener_mt

-- mp.Listener(address [, {authkey=s, backlog=n}]) -> Listener
function exports.Listener(address, opts)
  local host, port = parse_address(address, "Listener")
  opts = check_opts(opts, "Listener", { authkey = true, backlog = true })
  local l = core.listen(host, port, opts.backlog)
  authkeys[l] = opts.authkey
  return l
end

-- l:accept([timeout]) -> Connection | nil, "timeout"; raises
-- AuthenticationError when the peer does not prove the authkey
function Lmethods.accept(self, timeout)
  local c, why = self:_accept(timeout)
  if not c then return nil, why end
  local key = authkeys[self]
  if key then return authenticate(c, key, true) end
  return c
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

-- mp.Client(address [, {authkey=s}]) -> Connection
function exports.Client(address, opts)
  local host, port = parse_address(address, "Client")
  opts = check_opts(opts, "Client", { authkey = true })
  local c = core.connect(host, port)
  if opts.authkey then return authenticate(c, opts.authkey, false) end
  return c
end

return M
