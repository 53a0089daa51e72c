-- Chaos families "hostile", "handles" and "handshake" (chaos/run.lua):
-- hostile peers of a Listener.
-- Two servers, each a forked process: a TCP Listener with an authkey and a
-- Unix-socket Listener without one. Each accepts a connection, reads
-- values from it (touching any handle it receives, as a server using
-- what it is sent would), answers "ping" with "pong", and goes on with the
-- next connection, catching the errors a bad peer causes. Variants:
--   bytes    40 attacks per trial, written with LuaSocket: random bytes,
--            frame headers with huge lengths, bad kinds or fd counts, frames
--            cut short, values that do not decode, bytecode (an untrusted
--            peer may not send functions), a wrong HMAC answer, an empty
--            connection; each attacker closes when done
--   handles  an unauthenticated peer sends an Array or a Queue (a handle:
--            the memfd goes along) to the Unix listener and truncates the
--            memfd through /proc/self/fd/N before sending, right after, or
--            20 ms after
--   idle     (the "handshake" family) only the TCP listener; 1 to 3 peers
--            connect and say nothing, or stop halfway through a frame
--            header, and stay; the good client comes next and must be
--            served within 2 s
-- Then a good client must be served within 3 s (else a hang), the server
-- must not have died of a signal (else a crash), and the server's fds at
-- the end are compared with those at its start (leaked fds).
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local lib = require "chaos.lib"

local KEY = "chaos-key"

-- Read a handle as a server would.
local function touch(v)
  if type(v) ~= "userdata" then return end
  pcall(function()
    if v.totable then v:totable() end
    if v.qsize then v:qsize(); v:get(0); v:put(1, 0) end
  end)
  pcall(function() v:close() end)
end

local function serve(l, stop, out)
  out[1] = lib.fds()
  while stop.value == 0 do
    local ok, c = pcall(l.accept, l, 0.1)
    if ok and c then
      while true do
        local ok2, v = pcall(c.recv, c, 0.5)
        if not ok2 or v == nil then break end
        touch(v)
        if v == "ping" then pcall(c.send, c, "pong") end
      end
      c:close()
    end
    ok, c = nil, nil                            -- luacheck: ignore
    collectgarbage()
  end
  l:close()
  collectgarbage(); collectgarbage()
  out[2] = lib.fds()
end

local function start_server(address, opts)
  local l = mp.Listener(address, opts)
  local stop, out = mp.RawValue("int32", 0), mp.RawArray("int64", 2)
  local p = mp.Process{ target = serve, args = { l, stop, out }, start_method = "fork" }
  p:start()
  -- l stays open here until the server stopped: closing it removes a
  -- Unix socket's path
  return { proc = p, stop = stop, out = out, address = l.address, listener = l,
           key = opts and opts.authkey }
end

-- Stop srv; returns hang, crash, leaked fds.
local function stop_server(srv)
  srv.stop.value = 1
  local code = srv.proc:join(5)
  local hang, crash, fds = 0, 0, 0
  if code == nil then
    hang = 1
    srv.proc:kill(); srv.proc:join(5)
  elseif code < 0 then
    crash = 1
    io.stderr:write(("chaos: hostile: the server of %s died of signal %d\n"):format(
      srv.address, -code))
  elseif srv.out[2] > srv.out[1] then
    fds = srv.out[2] - srv.out[1]
  end
  srv.proc:close(); srv.stop:close(); srv.out:close(); srv.listener:close()
  return hang, crash, fds
end

local function good_client(srv)
  local c = mp.Client(srv.address, srv.key and { authkey = srv.key } or nil)
  c:send("ping")
  return c:recv(2) == "pong"
end

-- ---- raw attacks ---------------------------------------------------------

local function rawconn(srv)
  local socket = require "socket"
  local s
  local host, port = srv.address:match("^(.*):(%d+)$")
  if host then
    s = socket.tcp()
    s:settimeout(2)
    if not s:connect(host, tonumber(port)) then s:close(); return nil end
  else
    s = require("socket.unix").stream()
    s:settimeout(2)
    if not s:connect(srv.address) then s:close(); return nil end
  end
  return s
end

local function header(len, nfds, kind)
  return string.pack("<I8I4I4", len, nfds, kind)
end

local function garbage(n)
  local t = {}
  for i = 1, n do t[i] = string.char(math.random(0, 255)) end
  return table.concat(t)
end

local ATTACKS = {
  function() return garbage(math.random(1, 4096)) end,
  function() return header(math.random(0, 1) == 0 and 0x7fffffffffffffff or 1 << 40, 0, 1) .. garbage(64) end,
  function() return header(16, math.random(1, 1000), 1) .. garbage(16) end,
  function() return header(8, 0, math.random(2, 0xffffffff)) .. garbage(8) end,
  function() return header(1000, 0, math.random(0, 1)) .. garbage(math.random(0, 999)) end,
  function() return header(32, 0, 1) .. garbage(32) end,
  function()
    local s = mp.dumps({ 1, "x", { y = 2.5 } })
    return header(#s, 0, 1) .. s:sub(1, math.random(0, #s - 1))
  end,
  function()                          -- a good value with a few bytes changed
    local s = mp.dumps({ 1, "two", { 3.5, true, { x = "y" } }, -0.0, 1 << 62 })
    for _ = 1, math.random(3) do
      local i = math.random(#s)
      s = s:sub(1, i - 1) .. string.char(math.random(0, 255)) .. s:sub(i + 1)
    end
    return header(#s, 0, 1) .. s
  end,
  function() local s = mp.dumps(function() return os.exit(3) end); return header(#s, 0, 1) .. s end,
  function() return string.rep("\255", math.random(1, 64)) end,
  function() return header(0, 0, 1) end,
  function() return garbage(math.random(1, 15)) end,
  function() return "" end,
}

local function attack(srv)
  local s = rawconn(srv)
  if not s then return end
  if srv.key and math.random() < 0.5 then
    s:receive(16 + 11 + 32)             -- the challenge, then a bad answer
    s:send(header(32, 0, 0) .. garbage(32))
  end
  local bytes = ATTACKS[math.random(#ATTACKS)]()
  s:send(bytes)
  s:close()
end

-- ---- handle attacks --------------------------------------------------------

-- fds of this process whose target names a memfd, as a set
local function memfds()
  local _, what = lib.fds()
  local t = {}
  for fd, target in pairs(what) do
    if target:find("memfd:", 1, true) then t[fd] = true end
  end
  return t
end

local function truncate_new(before)
  for fd in pairs(memfds()) do
    if not before[fd] then
      local f = io.open("/proc/self/fd/" .. fd, "w")   -- O_TRUNC: size 0
      if f then f:close() end
    end
  end
end

local function handle_attack(srv)
  local c = mp.Client(srv.address)
  local before = memfds()
  local obj = math.random() < 0.5 and mp.Array("int32", 4096) or mp.Queue()
  if obj.put then obj:put("x") end
  local when = math.random(3)
  if when == 1 then truncate_new(before) end
  pcall(c.send, c, obj)
  if when == 3 then lib.sleep(0.02) end
  if when >= 2 then truncate_new(before) end
  lib.sleep(0.1)
  c:close()
  obj:close()
end

-- ---- silent peers ----------------------------------------------------------

-- 1 to 3 connections that say nothing or stop halfway through a frame
-- header, then the good client (see trial).
local function idle_peers(srv)
  local host, port = srv.address:match("^(.*):(%d+)$")
  local conns = {}
  for i = 1, math.random(3) do
    if math.random() < 0.5 then
      conns[i] = core.connect(host, port)
    else
      local s = rawconn(srv)
      if s then s:send(header(32, 0, 0):sub(1, math.random(15))) end
      conns[i] = s
    end
    lib.sleep(math.random() * 0.02)
  end
  return conns
end

local function trial(_, k, variant)
  local r = { hangs = 0, crashes = 0, fds = 0 }
  local path = ("/tmp/mp-chaos-%d-%d.sock"):format(core.getpid(), k)
  local servers, idle = {}, nil
  if variant == "idle" then
    servers[1] = start_server("127.0.0.1:0", { authkey = KEY })
    idle = idle_peers(servers[1])
  elseif variant == "bytes" then
    servers[1] = start_server(path)
    servers[2] = start_server("127.0.0.1:0", { authkey = KEY })
    for _ = 1, 40 do attack(servers[math.random(2)]) end
  else
    servers[1] = start_server(path)
    handle_attack(servers[1])
  end
  for _, srv in ipairs(servers) do
    if srv.proc:is_alive() then
      local v = lib.bounded(variant == "idle" and 2 or 3, good_client, srv)
      if v ~= "ok" then
        io.stderr:write(("chaos: hostile %s: the good client of %s: %s\n"):format(
          variant, srv.address, v))
        r.hangs = r.hangs + 1
      end
    end
    for _, c in ipairs(idle or {}) do c:close() end
    idle = nil
    local hang, crash, fds = stop_server(srv)
    r.hangs, r.crashes, r.fds = r.hangs + hang, r.crashes + crash, r.fds + fds
  end
  os.remove(path)
  return r
end

if mp.is_main() then lib.batch(trial, 120) end
