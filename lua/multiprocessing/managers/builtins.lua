-- multiprocessing.managers.builtins: what a manager's server does itself
-- rather than an object's method: its own calls (oid 0: create, transit,
-- adopt, number_of_objects, debug_info, channel, shutdown, info), the
-- objects create makes (a SyncManager's typeids, the values a registered
-- callable returns) and the calls of a custom object.
--
-- server.lua's dispatch looks a method up in `own` and runs `custom` for a
-- custom object's calls, as own.name(srv, srv, w, args...) and
-- custom(srv, o, w, name, args...); errors they raise are the caller's.

local core = require "multiprocessing.core"
local objects = require "multiprocessing.managers.objects"
local sync = require "multiprocessing.managers.sync"
local proxies = require "multiprocessing.managers.proxies"
local refs = require "multiprocessing.managers.refs"

local cl_ref, getpid = refs.cl_ref, core.getpid

local M = {}
local methods = {}
M.methods = methods        -- the Server's (server.lua installs them)

-- srv:resolve(p) -> the object a proxy of this manager names, or nil
function methods:resolve(p)
  local st = proxies.state(p)
  if st and (st.sid == self.sid or st.sid == nil and st.addr == self.address) then
    return self.objects[st.oid]
  end
  return nil
end

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

-- o, now one of srv's objects, with a new id and no reference yet
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

-- custom(srv, o, w, name, ...) -> the results of custom object o's exposed
-- method name (a proxy where its method_to_typeid names a typeid)
function M.custom(self, o, _, name, ...)
  if not o.exposed_set[name] then
    error("'" .. tostring(name) .. "' is not exposed by this object", 0)
  end
  local m2t = o.m2t
  local typeid = m2t and m2t[name]
  if typeid then return as_proxy(self, typeid, (objects.custom_call(o, name, ...))) end
  return objects.custom_call(o, name, ...)
end

local own = {}
M.own = own

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

-- transit(oid) -> true: a transit reference for a proxy being serialized
-- by its holder (false: no such object)
function own.transit(self, _, _, oid)
  local o = self.objects[oid]
  if not o then return false end
  refs.transit(o)
  return true
end

-- adopt(oid) -> true: the receiver of such a proxy makes a transit
-- reference its connection's (false: no such object)
function own.adopt(self, _, w, oid)
  local o = self.objects[oid]
  if not o then return false end
  refs.adopt(o, self.clients[w.conn])
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

-- shutdown() -> true: the loop ends after this turn
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

return M
