-- multiprocessing.managers.objects: the shared data as the manager's
-- server holds them (docs/managers.md): dict, Namespace, list, Value,
-- Array and the objects of registered types; managers/sync.lua adds the
-- sync objects and queues to the same table of kinds.
--
-- Each kind is a table of methods called by the server loop as
-- method(srv, obj, w, ...args) where w is the request ({conn=, seq=}).
-- A method returns its results, which the server sends back at once, or
-- srv:park(w, ...) (returns PARK) for a call that must wait: the reply is
-- sent later by srv:grant(w, ...), when the object can grant it, or by the
-- waiter's on_timeout when its deadline passes (managers/sync.lua). A
-- method that raises answers with the error.

local type, error, pairs, tostring, getmetatable, rawget =
      type, error, pairs, tostring, getmetatable, rawget
local mathtype, floor, tointeger = math.type, math.floor, math.tointeger
local remove, insert, sort = table.remove, table.insert, table.sort

local M = {}
local kinds = {}
M.kinds = kinds

-- kind(name, ...) -> a new table of methods, those of the objects of kind
-- name and of each other name given (a variant: RLock of Lock...)
local function kind(...)
  local methods = {}
  for _, name in ipairs { ... } do kinds[name] = methods end
  return methods
end
M.kind = kind

-- ---- dict, Namespace -------------------------------------------------------

local function count(t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n
end

local dict = kind("dict")

function M.new_dict(t)
  if t ~= nil and type(t) ~= "table" then error("dict: table expected, got " .. type(t), 0) end
  local copy = {}
  if t then for k, v in pairs(t) do copy[k] = v end end
  return { kind = "dict", t = copy }
end

function dict.getitem(_, o, _, k) return o.t[k] end
function dict.setitem(_, o, _, k, v)
  if k == nil then error("dict key is nil", 0) end
  if k ~= k then error("dict key is NaN", 0) end
  o.t[k] = v
end
function dict.len(_, o) return count(o.t) end
function dict.get(_, o, _, k, default)
  local v = o.t[k]
  if v == nil then return default end
  return v
end
function dict.keys(_, o)
  local r = {}
  for k in pairs(o.t) do r[#r + 1] = k end
  return r
end
function dict.values(_, o)
  local r = {}
  for _, v in pairs(o.t) do r[#r + 1] = v end
  return r
end
function dict.items(_, o)
  local r = {}
  for k, v in pairs(o.t) do r[#r + 1] = { k, v } end
  return r
end
function dict.update(_, o, _, t)
  if type(t) ~= "table" then error("update: table expected, got " .. type(t), 0) end
  for k, v in pairs(t) do o.t[k] = v end
end
function dict.pop(_, o, _, k, default)
  local v = o.t[k]
  if v == nil then return default end
  o.t[k] = nil
  return v
end
function dict.setdefault(_, o, _, k, v)
  if k == nil then error("dict key is nil", 0) end
  local old = o.t[k]
  if old ~= nil then return old end
  o.t[k] = v
  return v
end
function dict.clear(_, o) o.t = {} end
function dict.copy(_, o)
  local r = {}
  for k, v in pairs(o.t) do r[k] = v end
  return r
end
function dict.incr(_, o, _, k, n)
  if k == nil then error("dict key is nil", 0) end
  if n == nil then n = 1 end
  if type(n) ~= "number" then error("incr: the step must be a number (got " .. type(n) .. ")", 0) end
  local v = o.t[k]
  if v == nil then v = 0 end
  if type(v) ~= "number" then
    error("incr: the value at " .. tostring(k) .. " is a " .. type(v) .. ", not a number", 0)
  end
  v = v + n
  o.t[k] = v
  return v
end
function dict.apply(_, o, _, k, fn, ...)
  if k == nil then error("dict key is nil", 0) end
  if type(fn) ~= "function" then error("apply: function expected, got " .. type(fn), 0) end
  local v = fn(o.t[k], ...)
  o.t[k] = v
  return v
end

local namespace = kind("Namespace")

local function check_name(k)
  if type(k) ~= "string" or k:sub(1, 1) == "_" then
    error("Namespace: a field name must be a string not starting with '_' (got "
          .. tostring(k) .. ")", 0)
  end
end

function M.new_namespace(t)
  local o = { kind = "Namespace", t = {} }
  if t ~= nil then
    if type(t) ~= "table" then error("Namespace: table expected, got " .. type(t), 0) end
    for k, v in pairs(t) do check_name(k); o.t[k] = v end
  end
  return o
end
namespace.getitem = dict.getitem
function namespace.setitem(_, o, _, k, v) check_name(k); o.t[k] = v end
namespace.copy = dict.copy
namespace.items = dict.items

-- ---- list -----------------------------------------------------------------

local list = kind("list")

function M.new_list(t)
  if t ~= nil and type(t) ~= "table" then error("list: table expected, got " .. type(t), 0) end
  local copy = {}
  if t then for i = 1, #t do copy[i] = t[i] end end
  return { kind = "list", t = copy }
end

-- an index in 1..n (negative counts from the end), or nil
local function index(o, i, extra)
  if mathtype(i) ~= "integer" then
    error("list index must be an integer (got " .. tostring(i) .. ")", 0)
  end
  local n = #o.t
  if i < 0 then i = n + 1 + i end
  if i < 1 or i > n + (extra or 0) then return nil end
  return i
end

local function must(o, i, extra)
  local j = index(o, i, extra)
  if not j then error("list index " .. tostring(i) .. " out of range (length " .. #o.t .. ")", 0) end
  return j
end

local function notnil(v, what)
  if v == nil then error(what .. ": a list item cannot be nil", 0) end
end

function list.getitem(_, o, _, i)
  local j = index(o, i)
  return j and o.t[j]
end
function list.setitem(_, o, _, i, v)
  notnil(v, "l[i] = v")
  o.t[must(o, i, 1)] = v
end
function list.len(_, o) return #o.t end
function list.append(_, o, _, v) notnil(v, "append"); o.t[#o.t + 1] = v end
function list.extend(_, o, _, t)
  if type(t) ~= "table" then error("extend: table expected, got " .. type(t), 0) end
  local n = #o.t
  for i = 1, #t do o.t[n + i] = t[i] end
end
function list.insert(_, o, _, i, v)
  notnil(v, "insert")
  insert(o.t, must(o, i, 1), v)
end
function list.pop(_, o, _, i)
  if #o.t == 0 and i == nil then return nil end
  return remove(o.t, i == nil and #o.t or must(o, i))
end
function list.remove(_, o, _, v)
  for i = 1, #o.t do
    if o.t[i] == v then remove(o.t, i) return true end
  end
  return false
end
function list.index(_, o, _, v)
  for i = 1, #o.t do if o.t[i] == v then return i end end
  return nil
end
function list.totable(_, o)
  local r = {}
  for i = 1, #o.t do r[i] = o.t[i] end
  return r
end
list.copy = list.totable
function list.items(_, o)
  local r = {}
  for i = 1, #o.t do r[i] = { i, o.t[i] } end
  return r
end
function list.incr(_, o, _, i, n)
  if n == nil then n = 1 end
  if type(n) ~= "number" then error("incr: the step must be a number (got " .. type(n) .. ")", 0) end
  local j = must(o, i)
  if type(o.t[j]) ~= "number" then
    error("incr: the item at " .. j .. " is a " .. type(o.t[j]) .. ", not a number", 0)
  end
  o.t[j] = o.t[j] + n
  return o.t[j]
end
function list.apply(_, o, _, i, fn, ...)
  if type(fn) ~= "function" then error("apply: function expected, got " .. type(fn), 0) end
  local j = must(o, i)
  local v = fn(o.t[j], ...)
  notnil(v, "apply")
  o.t[j] = v
  return v
end

-- ---- Value, Array --------------------------------------------------------

-- type name -> {class, min, max}
local TYPES = {}
do
  local ints = {
    int8 = { -128, 127 }, uint8 = { 0, 255 }, int16 = { -32768, 32767 },
    uint16 = { 0, 65535 }, int32 = { -2147483648, 2147483647 },
    uint32 = { 0, 4294967295 }, int64 = { math.mininteger, math.maxinteger },
  }
  for name, r in pairs(ints) do TYPES[name] = { "int", r[1], r[2] } end
  TYPES.float = { "float" }
  TYPES.double = { "float" }
  TYPES.bool = { "bool" }
  local codes = { b = "int8", B = "uint8", h = "int16", H = "uint16", i = "int32",
                  I = "uint32", l = "int64", L = "int64", q = "int64", Q = "int64",
                  f = "float", d = "double", ["?"] = "bool", c = "uint8" }
  for code, name in pairs(codes) do TYPES[code] = TYPES[name] end
end

local function check_type(typ, fname)
  if TYPES[typ] == nil then
    error(fname .. ": unknown type " .. tostring(typ), 0)
  end
  return TYPES[typ]
end

local function coerce(spec, v, fname)
  local class = spec[1]
  if class == "int" then
    if type(v) == "number" and mathtype(v) == "float" and v == floor(v) then
      v = tointeger(v) or v
    end
    if mathtype(v) ~= "integer" or v < spec[2] or v > spec[3] then
      error(fname .. ": " .. tostring(v) .. " is not an integer in range", 0)
    end
  elseif class == "float" then
    if type(v) ~= "number" then error(fname .. ": number expected, got " .. type(v), 0) end
    v = v + 0.0
  elseif type(v) ~= "boolean" then
    error(fname .. ": boolean expected, got " .. type(v), 0)
  end
  return v
end

local value = kind("Value")

function M.new_value(typ, init)
  local spec = check_type(typ, "Value")
  if init == nil then init = spec[1] == "bool" and false or 0 end
  return { kind = "Value", typ = typ, spec = spec, value = coerce(spec, init, "Value") }
end
function value.get(_, o) return o.value end
function value.set(_, o, _, v) o.value = coerce(o.spec, v, "Value") end

local array = kind("Array")

function M.new_array(typ, init)
  local spec = check_type(typ, "Array")
  local t = {}
  if mathtype(init) == "integer" and init >= 0 then
    local zero = coerce(spec, spec[1] == "bool" and false or 0, "Array")
    for i = 1, init do t[i] = zero end
  elseif type(init) == "table" then
    for i = 1, #init do t[i] = coerce(spec, init[i], "Array") end
  else
    error("Array: a size (integer >= 0) or a list expected (got " .. tostring(init) .. ")", 0)
  end
  return { kind = "Array", typ = typ, spec = spec, t = t }
end
function array.getitem(_, o, _, i)
  if mathtype(i) ~= "integer" then error("Array index must be an integer", 0) end
  return o.t[i]
end
function array.setitem(_, o, _, i, v)
  if mathtype(i) ~= "integer" or i < 1 or i > #o.t then
    error("Array index " .. tostring(i) .. " out of range (length " .. #o.t .. ")", 0)
  end
  o.t[i] = coerce(o.spec, v, "Array")
end
function array.len(_, o) return #o.t end
array.totable = list.totable
array.items = list.items

-- ---- custom types (BaseManager:register) ------------------------------------

-- The object a registered callable returned; its exposed methods are
-- called as obj:method(...), in the server.
kind("custom")          -- no methods of its own: builtins.lua calls them
M.custom_call = function(o, name, ...)
  local f = o.obj[name]
  if type(f) ~= "function" then
    error("'" .. tostring(name) .. "' is not a method of this object", 0)
  end
  return f(o.obj, ...)
end

-- The methods a registered object exposes by default: its function fields
-- and its class's (metatable __index table), whose names do not start
-- with '_'.
function M.exposed_of(obj)
  local names, seen = {}, {}
  local function scan(t)
    if type(t) ~= "table" then return end
    for k, v in pairs(t) do
      if type(k) == "string" and k:sub(1, 1) ~= "_" and type(v) == "function"
         and not seen[k] then
        seen[k] = true
        names[#names + 1] = k
      end
    end
  end
  scan(obj)
  local mt = getmetatable(obj)
  if type(mt) == "table" then scan(rawget(mt, "__index")) end
  sort(names)
  return names
end

return M
