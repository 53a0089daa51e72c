-- multiprocessing.managers.proxies: the proxies of a manager's objects
-- (docs/managers.md).
--
-- A proxy is an empty table whose metatable knows its kind; what it needs
-- to reach its object (address, authkey, object id, kind) lives in a weak
-- side table, never in the proxy's own fields, so that every key
-- (including "_x") is free for d[k]. A proxy is a handle (__mp_reduce,
-- docs/design.md, decision 1) of kind "ManagerProxy" with no fds: it
-- travels through pipes, queues and process arguments and reconnects in
-- the receiver. Each method is one call (managers/client.lua). Each proxy
-- holds a reference to its object, given back by its __gc (below).

local core = require "multiprocessing.core"
local errors = require "multiprocessing.errors"
local sync = require "multiprocessing.synchronize"
local client = require "multiprocessing.managers.client"
local codec = require "multiprocessing.codec"

local type, error, pairs, ipairs, tostring, setmetatable =
      type, error, pairs, ipairs, tostring, setmetatable
local mathtype = math.type
local call_st = client.call_st

local M = {}

local pstate = setmetatable({}, { __mode = "k" })     -- proxy -> state
local mts = {}                                         -- kind -> metatable

local function st_of(p)
  local st = pstate[p]
  if not st then error("bad self: a manager proxy expected (use ':' to call its methods)", 3) end
  return st
end

-- proxies.state(p) -> {addr=, key=, oid=, kind=, exposed=, sid=} or nil
function M.state(p) return pstate[p] end

local function new_proxy(st)
  local p = setmetatable({}, mts[st.kind] or mts.custom)
  pstate[p] = st
  return p
end

-- Reference counting (docs/managers.md, "Object lifetime"). A proxy
-- holds one reference to its object: st.owner is the connection entry
-- (managers/client.lua) whose reference it is, or st.inner is set for a
-- proxy that lives in its own manager's server (a value stored in a dict,
-- a queue...), whose reference the server counts itself. M.server is that
-- server, in the server's process (managers/server.lua sets it; its
-- counts are managers/refs.lua's).
M.server = nil

-- M.server when this process is the server's own: a child forked from it
-- (get_server, then Processes, then serve_forever) holds a copy that
-- serves nothing, and its proxies are clients' proxies
local getpid = core.getpid
local function server_here()
  local srv = M.server
  if srv and srv.pid == getpid() then return srv end
  return nil
end

local function is_local(srv, st)
  if srv == nil then return false end
  if st.sid == nil then return st.addr == srv.address end
  return st.sid == srv.sid
end

-- __gc: give the reference back, without a message, a wait or a raise
local function collect(p)
  local st = pstate[p]
  if not st then return end
  if st.inner then
    local srv = server_here()
    if srv and st.inner == srv then srv:unref_later(st.oid) end
  elseif st.owner then
    client.release(st)
  end
end

local function remote(name)
  return function(p, ...)
    local st = st_of(p)
    return call_st(st, name, ...)
  end
end

-- A proxy being serialized takes a reference for its receiver first:
-- in its own server, one for the client the answer goes to ("c") or a
-- transit one ("t"); in a call to its own manager, none (the server takes
-- one as it decodes the call, while the caller's proxy still holds its
-- own); anywhere else, a transit reference, synchronously, from its
-- manager ("t"), which the receiver adopts.
local function reduce(p)
  local st = pstate[p]
  local ref
  local srv = server_here()
  if is_local(srv, st) then
    ref = srv:ref_out(st.oid)
  else
    local s = client.sending
    if not (s and s.addr == st.addr and s.key == st.key) and not codec.checking()
       and client.transit(st) then
      ref = "t"
    end
  end
  return "ManagerProxy", { addr = st.addr, key = st.key, oid = st.oid, kind = st.kind,
                           exposed = st.exposed, sid = st.sid, ref = ref }
end

local function rebuild_proxy(st)
  if type(st) ~= "table" or type(st.addr) ~= "string" or type(st.key) ~= "string"
     or mathtype(st.oid) ~= "integer" or type(st.kind) ~= "string"
     or (st.exposed ~= nil and type(st.exposed) ~= "table")
     or (st.sid ~= nil and type(st.sid) ~= "string") then
    error(errors.new("SerializationError", "malformed manager proxy"), 0)
  end
  local ref = st.ref
  st.ref = nil
  local srv = server_here()
  if is_local(srv, st) then
    if srv:ref_in(st.oid, ref == "t") then st.inner = srv end
  elseif ref == "c" then
    -- in an answer: the connection it came by holds its reference (and
    -- its address is the one this process reaches that server by)
    local e = client.receiving
    if e and e.key == st.key then
      st.addr, st.owner = e.addr, e
    else
      st.owner = client.owner(st.addr, st.key)
    end
  elseif ref == "t" then
    client.adopt(st)
  end
  return new_proxy(st)
end
M._rebuild = rebuild_proxy
core.register_handle("ManagerProxy", rebuild_proxy)

local function tostr(p)
  local st = pstate[p]
  return "<" .. st.kind .. "Proxy(" .. st.oid .. ", manager " .. st.addr .. ")>"
end

local function snapshot(p)
  local items = call_st(pstate[p], "items")
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
    __gc = collect,
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
  return (call_st(st, "getitem", k))
end
local function setitem(p, k, v)
  local st = pstate[p]
  call_st(st, "setitem", k, v)
end
local function len(p)
  local st = pstate[p]
  return (call_st(st, "len"))
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

-- lock:with(fn, ...) and cond:wait_for(pred [, timeout]): the module's
-- own (synchronize.lua), which use only acquire, release and wait
local with, wait_for = sync.with, sync.wait_for

kind_mt("Lock", { "acquire", "release", "locked" }, nil, nil, { with = with })
mts.RLock = mts.Lock
kind_mt("Semaphore", { "acquire", "release", "get_value" }, nil, nil, { with = with })
mts.BoundedSemaphore = mts.Semaphore

kind_mt("Condition", { "acquire", "release", "locked", "wait", "notify", "notify_all" },
        nil, nil, { with = with, wait_for = wait_for })

kind_mt("Event", { "is_set", "set", "clear", "wait" })

local BARRIER_FIELDS = { parties = true, n_waiting = true, broken = true }
kind_mt("Barrier", { "wait", "abort", "reset" },
  function(p, k)
    if BARRIER_FIELDS[k] then
      local st = pstate[p]
      return (call_st(st, k))
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
      return (call_st(st, "get"))
    end
  end,
  function(p, k, v)
    if k ~= "value" then error("cannot set field '" .. tostring(k) .. "' of a Value proxy", 3) end
    local st = pstate[p]
    call_st(st, "set", v)
  end)

local array_mt = kind_mt("Array", { "totable" },
  function(p, k) if mathtype(k) == "integer" then return getitem(p, k) end end,
  function(p, k, v) setitem(p, k, v) end)
array_mt.__len = len

-- a registered type's object: its exposed methods
mts.custom = {
  __name = "multiprocessing.Proxy",
  __mp_reduce = reduce,
  __gc = collect,
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

M.new = new_proxy
return M
