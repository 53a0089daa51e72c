-- multiprocessing.connection: Pipe, Connection (csrc/conn.c) and wait.
--
-- mp.wait watches connections, process sentinels, raw fds and any object
-- that has fileno() (queues); an object may also have _ready() to confirm
-- that a read would not block, for fds that can wake spuriously.

local core = require "multiprocessing.core"

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

-- What to poll for object o: its fd, and whether it is ready already.
local function fd_of(o, i)
  local t = type(o)
  if t == "number" then return o end
  local cls = classname(o)
  if cls == "multiprocessing.Connection" then
    return o:fileno(), o:_buffered()
  elseif cls == "multiprocessing.Process" then
    local s = o.sentinel
    if not s then
      error("bad argument #1 to 'wait' (objects[" .. i .. "] is a process that is not started or is closed)", 3)
    end
    return s
  elseif (t == "table" or t == "userdata") and o.fileno then
    return o:fileno(), o._ready and o:_ready()
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
  local fds, ready = {}, {}
  for i, o in ipairs(objects) do
    local fd, now = fd_of(o, i)
    fds[i] = fd
    if now then ready[#ready + 1] = o end
  end
  if #ready > 0 then return ready end
  local deadline = timeout and monotonic() + timeout
  while true do
    local left = deadline and deadline - monotonic()
    if left and left < 0 then left = 0 end
    local hits = poll(fds, left)
    for _, i in ipairs(hits) do
      local o = objects[i]
      if type(o) == "number" or not (o._ready and classname(o) ~= "multiprocessing.Connection")
         or o:_ready() then
        ready[#ready + 1] = o
      end
    end
    if #ready > 0 or #hits == 0 then return ready end
    if deadline and monotonic() >= deadline then return ready end
  end
end

return M
