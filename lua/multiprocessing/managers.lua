-- multiprocessing.managers: BaseManager, SyncManager and mp.Manager
-- (docs/managers.md).
--
-- A manager is a server process (managers/server.lua, one event loop) that
-- holds plain Lua values (managers/objects.lua) and small sync state
-- machines (managers/sync.lua); other processes reach them through proxies
-- (managers/proxies.lua) over the transport of managers/client.lua. This
-- module makes managers: it registers typeids, starts, connects, serves
-- and shuts down, and lets a manager travel as a client of its server.

local core = require "multiprocessing.core"
local errors = require "multiprocessing.errors"
local process = require "multiprocessing.process"
local check = require "multiprocessing.check"
local client = require "multiprocessing.managers.client"
local proxies = require "multiprocessing.managers.proxies"

local type, error, pairs, ipairs, pcall, tostring, setmetatable, getmetatable, rawget, require =
      type, error, pairs, ipairs, pcall, tostring, setmetatable, getmetatable, rawget, require
local getpid = core.getpid
local call, forget, new_proxy, log = client.call, client.forget, proxies.new, client.log

local M = {}
local exports = {}
M.exports = exports
M._call = call                       -- for the specs: a call by address

-- ---- managers ------------------------------------------------------------

local SYNC_TYPEIDS = { "dict", "list", "Namespace", "Queue", "JoinableQueue", "Lock",
  "RLock", "Semaphore", "BoundedSemaphore", "Condition", "Event", "Barrier", "Value",
  "Array" }

local Manager = {}            -- the methods
local MMT = {}
local counter = 0

-- The key of managers made without one: the process's authkey (made by
-- the main process, inherited by every child under every start method).
local function default_authkey()
  return process.exports.current_process().authkey
end

local OPTS = { address = "string", authkey = "string", start_method = "string" }

-- (level 3: the caller of the public constructor)
local function check_opts(opts, fname)
  opts = check.options(opts, 1, fname, OPTS, 3)
  if opts.address == "" then check.argerror(1, fname, "'address' must not be empty", 3) end
  if opts.authkey == "" then check.argerror(1, fname, "'authkey' must not be empty", 3) end
  check.choice(opts.start_method, process.START_METHODS, 1, fname, "'start_method'", 3)
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

local REGISTER_OPTS = { exposed = "table", proxytype = true, method_to_typeid = true }

-- m:register(typeid [, callable [, {exposed={names}, proxytype=kind,
--   method_to_typeid={method=typeid}}]]) -> m; raises on bad arguments
function Manager.register(self, typeid, callable, opts)
  if type(typeid) ~= "string" or typeid == "" or typeid:sub(1, 1) == "_" or Manager[typeid] then
    check.argerror(1, "register", "a typeid: a name that is not a manager method "
                   .. "and does not start with '_', got " .. tostring(typeid))
  end
  check.type(callable, "callable", 2, "register")
  opts = check.options(opts, 3, "register", REGISTER_OPTS)
  if opts.exposed ~= nil then
    for _, n in ipairs(opts.exposed) do
      if type(n) ~= "string" then
        check.argerror(3, "register", "'exposed' must be a list of names, got a "
                       .. type(n) .. " in it")
      end
    end
  end
  check.choice(opts.proxytype, { "dict", "list", "Namespace" }, 3, "register", "'proxytype'")
  local m2t = opts.method_to_typeid
  if m2t ~= nil then
    if type(m2t) ~= "table" then
      check.argerror(3, "register", "'method_to_typeid' must be a table {method = typeid}")
    end
    if opts.proxytype ~= nil then
      check.argerror(3, "register",
                     "'method_to_typeid' is for a type's methods: a proxytype has none")
    end
    local copy = {}
    for name, t in pairs(m2t) do
      if type(name) ~= "string" or type(t) ~= "string" then
        check.argerror(3, "register", "'method_to_typeid' maps method names to typeids "
                       .. "(strings), got " .. type(name) .. " -> " .. type(t))
      end
      local e = self._registry[t]
      local ok = t == typeid or PROXYTYPES[t] or (e and (e.builtin == nil or PROXYTYPES[e.builtin]))
      if not ok then
        check.argerror(3, "register", "'method_to_typeid' names " .. (e and "typeid '" .. t
                       .. "', which cannot serve a method's result" or "unknown typeid '"
                       .. t .. "'") .. " (register it first; dict, list and Namespace are "
                       .. "always known)")
      end
      if opts.exposed then
        local found = false
        for _, n in ipairs(opts.exposed) do found = found or n == name end
        if not found then
          check.argerror(3, "register", "'method_to_typeid' names '" .. name
                         .. "', which is not in 'exposed'")
        end
      end
      copy[name] = t
    end
    m2t = copy
  end
  if self._state == "started" or self._state == "serving" then
    error("register: the manager's server is already running", 2)
  end
  self._registry[typeid] = { callable = callable, exposed = opts.exposed,
                             proxytype = opts.proxytype, method_to_typeid = m2t }
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

-- raise unless m is still new (fname: the method called), and has an
-- address
local function check_initial(self, fname)
  if self._state ~= "initial" then
    error(errors.new("ProcessError", fname .. ": the manager is " .. self._state), 3)
  end
  if not self._address then error(fname .. ": the manager needs an address", 3) end
end

-- m:<typeid>(...) -> a proxy of a new object made in the server
local function creator(typeid)
  return function(self, ...)
    if getmetatable(self) ~= MMT then
      error("bad self: a manager expected (use ':' to call m:" .. typeid .. "(...))", 2)
    end
    check_running(self, typeid)
    local addr, key = self.address, self._authkey
    local oid, kind, exposed, sid = call(addr, key, 0, "create", typeid, ...)
    -- the proxy keeps its manager alive (its __gc would stop the server);
    -- it holds the reference that create gave this process's connection
    return new_proxy({ addr = addr, key = key, oid = oid, kind = kind, exposed = exposed,
                       sid = sid, mgr = self, owner = client.owner(addr, key) })
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
  local r, w, p
  local okn, err0 = pcall(function()
    r, w = mp.Pipe(false)
    p = mp.Process{ target = M._serve_child, args = { server_spec(self, address), w },
                    daemon = true, name = self._name, start_method = self._method }
  end)
  if not okn then                        -- (EMFILE...): leave no socket directory
    if r then r:close(); w:close() end
    if self._dir then os.remove(self._dir); self._dir = nil end
    error(err0, 0)
  end
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
  check_initial(self, "connect")
  self.address = self._address
  call(self.address, key_of(self), 0, "info")      -- reachable, and the key is right
  self._state = "connected"
  return self
end

-- A manager's server in this process (m:get_server()): it listens from
-- the start; srv:serve_forever() serves until a client calls shutdown.
local ServerMT = { __name = "multiprocessing.ManagerServer" }
ServerMT.__index = {}

-- srv:serve_forever(): serve in this process until a client calls
-- shutdown, then close; raises if it served already
function ServerMT.__index.serve_forever(self)
  local srv = self._srv
  if not srv then error(errors.new("ProcessError", "serve_forever: the server is closed"), 2) end
  self._srv = nil
  local ok, err = pcall(srv.serve, srv)
  self._mgr._state = "shutdown"
  if not ok then pcall(srv.close, srv); error(err, 0) end
end

-- srv:close(): stop listening without serving (twice is fine)
function ServerMT.__index.close(self)
  local srv = self._srv
  if not srv then return end
  self._srv = nil
  self._mgr._state = "shutdown"
  pcall(srv.close, srv)
end
ServerMT.__close = ServerMT.__index.close
ServerMT.__gc = ServerMT.__index.close
ServerMT.__tostring = function(self)
  return "<ManagerServer(" .. tostring(self.address) .. (self._srv and "" or ", closed") .. ")>"
end

-- m:get_server() -> a server that listens at the manager's address now
-- (srv.address: port 0 resolved); srv:serve_forever() serves here
function Manager.get_server(self)
  check_initial(self, "get_server")
  local srv = require("multiprocessing.managers.server").new(server_spec(self, self._address))
  self.address = srv.address
  self._state = "serving"
  return setmetatable({ address = srv.address, _srv = srv, _mgr = self }, ServerMT)
end

-- m:serve_forever(): this process serves until a client calls shutdown
function Manager.serve_forever(self)
  check_initial(self, "serve_forever")
  Manager.get_server(self):serve_forever()
end

-- m:info() -> {objects=, clients=, parked=, pending=, refused=}, server pid
function Manager.info(self)
  check_running(self, "info")
  return call(self.address, self._authkey, 0, "info")
end

-- m:_number_of_objects() -> the objects the server holds, after a full
-- collection in the server (for specs and debugging, as Python's)
function Manager._number_of_objects(self)
  check_running(self, "_number_of_objects")
  return (call(self.address, self._authkey, 0, "number_of_objects"))
end

-- m:_debug_info() -> {{id=, kind=, refs=, transit=, parked=}, ...}: each object
-- the server holds and its references, after a full collection
function Manager._debug_info(self)
  check_running(self, "_debug_info")
  return (call(self.address, self._authkey, 0, "debug_info"))
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
  if p:is_alive() then pcall(client.post, addr, key, 0, "shutdown") end
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
local function rebuild_manager(st)
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
end
M._rebuild = rebuild_manager
core.register_handle("Manager", rebuild_manager)

return M

