-- multiprocessing.cluster.conn: a Redis connection that survives a Redis
-- restart, for the cluster pool (docs/cluster.md).
--
-- The C module multiprocessing.redis (csrc/redis/redis.c) connects, sends
-- and reads, and closes a connection that failed; this file parses the
-- URL, authenticates, selects the database, and on a failed call
-- reconnects with back-off (50 ms doubling to 2 s) until `retry_for`
-- seconds have passed, then retries the call. A retried XADD may add its
-- entry twice: delivery is at-least-once and the client dedupes results by
-- task number.

local redis = require "multiprocessing.redis"
local core = require "multiprocessing.core"
local errors = require "multiprocessing.errors"

local tonumber, type, error, select, unpack = tonumber, type, error, select, table.unpack
local monotonic = core.monotonic

local M = {}

local function unescape(s)
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

-- conn.parse(url) -> {path= | host=, port=, user=, password=, db=}
-- redis://[user:pass@]host[:port][/db], unix://[user:pass@]/path[?db=n]
function M.parse(url)
  if type(url) ~= "string" then error("redis URL expected, got " .. type(url), 3) end
  local scheme, rest = url:match("^(%a+)://(.*)$")
  if scheme == "rediss" then
    error("rediss:// (TLS) is not supported: the hiredis this module is built with has no TLS", 3)
  end
  if scheme ~= "redis" and scheme ~= "unix" then
    error("bad redis URL '" .. url .. "' (redis://[user:pass@]host[:port][/db] or unix:///path[?db=n])", 3)
  end
  local t = {}
  local cred, tail = rest:match("^(.-)@(.*)$")
  if cred then
    rest = tail
    local u, p = cred:match("^(.-):(.*)$")
    if u then t.user, t.password = unescape(u), unescape(p)
    else t.password = unescape(cred) end
    if t.user == "" then t.user = nil end
  end
  if scheme == "unix" then
    local path, q = rest:match("^([^?]*)%??(.*)$")
    t.path = path
    t.db = tonumber(q:match("db=(%d+)"))
  else
    local hostport, db = rest:match("^([^/]*)/?(%d*)$")
    if not hostport then error("bad redis URL '" .. url .. "'", 3) end
    local host, port = hostport:match("^%[(.*)%]:?(%d*)$")
    if not host then host, port = hostport:match("^([^:]*):?(%d*)$") end
    t.host = host ~= "" and host or "127.0.0.1"
    t.port = tonumber(port) or 6379
    t.db = tonumber(db)
  end
  return t
end

local Conn = {}
Conn.__index = Conn

-- Connect once: returns the C connection or nil, msg.
local function open(cfg, timeout)
  local c, err = redis.connect{ path = cfg.path, host = cfg.host, port = cfg.port,
                                connect_timeout = 2, timeout = timeout }
  if not c then return nil, err end
  -- only an error reply is a refusal (wrong password, bad db); an I/O
  -- failure on the way is a connection that broke, retried like any other
  if cfg.password then
    local ok, e, kind
    if cfg.user then ok, e, kind = c:command("AUTH", cfg.user, cfg.password)
    else ok, e, kind = c:command("AUTH", cfg.password) end
    if not ok then
      c:close(); return nil, "AUTH: " .. tostring(e), kind == "error" and "auth" or nil
    end
  end
  if cfg.db and cfg.db ~= 0 then
    local ok, e, kind = c:command("SELECT", cfg.db)
    if not ok then
      c:close(); return nil, "SELECT: " .. tostring(e), kind == "error" and "auth" or nil
    end
  end
  return c
end

-- conn.new(url, {timeout=, retry_for=}) -> Conn; raises a ProcessError if
-- Redis cannot be reached within retry_for seconds (a wrong password at once)
function M.new(url, opts)
  local self = setmetatable({ cfg = M.parse(url), url = url,
    timeout = opts and opts.timeout or 30,
    retry_for = opts and opts.retry_for or 60 }, Conn)
  self:_reconnect(2)
  return self
end

function Conn:_reconnect(level)
  local deadline = monotonic() + self.retry_for
  local delay = 0.05
  while true do
    local c, err, kind = open(self.cfg, self.timeout)
    if c then self.c = c; self.reconnects = (self.reconnects or -1) + 1; return end
    if kind == "auth" or monotonic() + delay > deadline then
      error(errors.new("ProcessError", "cannot reach Redis at " .. self.url .. ": " .. err), level + 1)
    end
    core.poll({}, delay)                  -- a sleep
    delay = delay * 2
    if delay > 2 then delay = 2 end
  end
end

-- A call that kept failing for retry_for seconds: raise a ProcessError.
local function give_up(self, deadline, word, msg)
  if monotonic() > deadline then
    error(errors.new("ProcessError", "Redis at " .. self.url .. ": " .. tostring(word)
                     .. " failed: " .. tostring(msg)), 3)
  end
end

-- c:call(word, ...) -> reply | nil, msg (a Redis error reply); a broken
-- connection (or a reply that timed out) is reopened and the command sent
-- again, for up to retry_for seconds, then a ProcessError is raised
function Conn:call(...)
  local deadline = monotonic() + self.retry_for
  while true do
    if not self.c or self.c:closed() then self:_reconnect(2) end
    local r, msg, kind = self.c:command(...)
    if kind ~= "io" then return r, msg end
    give_up(self, deadline, (...), msg)
  end
end

-- c:pipeline(cmds) -> list of {reply, msg} per command (each command a
-- list of words); resent whole after a reconnect, for up to retry_for
-- seconds, then a ProcessError is raised
function Conn:pipeline(cmds)
  local deadline = monotonic() + self.retry_for
  while true do
    if not self.c or self.c:closed() then self:_reconnect(2) end
    local c = self.c
    for i = 1, #cmds do c:append(unpack(cmds[i], 1, cmds[i].n or #cmds[i])) end
    local out, broken = {}, nil
    for i = 1, #cmds do
      local r, msg, kind = c:recv()
      if kind == "io" then broken = msg break end
      out[i] = { r, msg }
    end
    if not broken then return out end
    give_up(self, deadline, cmds[1] and cmds[1][1], broken)
  end
end

-- The non-blocking pair for a blocking read: c:send(word, ...) queues and
-- sends; c:poll(timeout) -> reply | nil, "timeout" | nil, msg (error
-- reply) | nil, "reset" (the connection broke: send again).
function Conn:send(...)
  if not self.c or self.c:closed() then self:_reconnect(2) end
  self.c:append(...)
  local r, msg, kind = self.c:recv(0)
  if r ~= nil or kind == "error" then self.early = { r, msg } end
  if kind == "io" then self.early = { nil, "reset" } end
  return select("#", ...)
end

function Conn:poll(timeout)
  local e = self.early
  if e then self.early = nil; return e[1], e[2] end
  local r, msg, kind = self.c:recv(timeout)
  if kind == "io" then return nil, "reset" end
  return r, msg
end

function Conn:fileno()
  if not self.c or self.c:closed() then self:_reconnect(2) end
  return self.c:fileno()
end

function Conn:close()
  if self.c then self.c:close() end
end

return M
