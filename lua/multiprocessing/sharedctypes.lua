-- multiprocessing.sharedctypes: Value, Array, RawValue, RawArray.
--
-- The objects are C userdata (csrc/sharedctypes.c) over a memfd segment;
-- this module validates the type, the initial value and the options, makes
-- the lock (a new RLock by default, as Python's) and fills the data. How a
-- Value or Array is rebuilt from a handle is registered by its C opener.

local core = require "multiprocessing.core"
local sync = require "multiprocessing.synchronize"
local check = require "multiprocessing.check"

local type, pcall, tostring, pairs, math_type =
      type, pcall, tostring, pairs, math.type
local byte = string.byte
local argerror = check.argerror

local M = {}
local exports = {}
M.exports = exports

-- The levels below count as error() does in the function that raises:
-- exports.X -> check_opts, new_value, new_array (3: the user's line) ->
-- ctype, fill (4). So exports.X never tail-calls them (a tail call would
-- drop its frame).

local function ctype(t, fname)
  if type(t) ~= "string" then
    argerror(1, fname, "type name or code expected, got " .. type(t), 4)
  end
  local code = core.ctype(t)
  if not code then
    argerror(1, fname, "unknown type '" .. t .. "' (int8 uint8 int16 uint16 " ..
             "int32 uint32 int64 uint64 float double bool char, or a code " ..
             "b B h H i I l L q Q f d c ?)", 4)
  end
  return code
end

local function check_opts(opts, fname)
  local lock = check.options(opts, 3, fname, { lock = true }, 3).lock
  if lock == nil or lock == true then return true end
  if lock == false then return false end
  if not sync.is_lock(lock) then
    argerror(3, fname, "'lock' must be a boolean, a Lock or an RLock, got " ..
             check.typename(lock), 3)
  end
  return lock
end

-- Fill obj by set(obj, i, v) for each value, closing obj and raising a
-- message that names the item if one is refused.
local function fill(obj, fname, items, n, what)
  local i = 0
  local ok, err = pcall(function()
    for j = 1, n do
      i = j
      obj[j] = items[j]
    end
  end)
  if not ok then
    obj:close()
    local msg = type(err) == "string" and err:gsub("^[^:]*:%d+: ", "") or tostring(err)
    argerror(2, fname, what .. " " .. i .. ": " .. msg, 4)
  end
end

-- A Value that makes its own lock keeps its element in the lock's segment,
-- beside the lock word: a locked update then moves one cache line between
-- processes instead of two.
local function new_value(fname, t, init, lock)
  local code = ctype(t, fname)
  local v
  if lock == true then
    lock = core.sync_new("RLock")
    v = core.shared_value_in_lock(code, lock)
  end
  v = v or core.shared_new(code, 1, false, lock)
  if init ~= nil then
    local ok, err = pcall(function() v.value = init end)
    if not ok then
      v:close()
      local msg = type(err) == "string" and err:gsub("^[^:]*:%d+: ", "") or tostring(err)
      argerror(2, fname, msg, 3)
    end
  end
  return v
end

local MAX_BYTES = 1 << 40        -- csrc/sharedctypes.c's bound on a segment

local function new_array(fname, t, init, lock)
  local code = ctype(t, fname)
  if lock == true then lock = core.sync_new("RLock") end
  local ti = type(init)
  local n
  if math_type(init) == "integer" then
    if init < 0 then argerror(2, fname, "size must be >= 0, got " .. init, 3) end
    local _, name, size = core.ctype(code)
    if init >= MAX_BYTES // size then
      argerror(2, fname, ("size %d too large: at most %d items of %s (1 TiB of shared memory)")
               :format(init, MAX_BYTES // size - 1, name), 3)
    end
    return core.shared_new(code, init, true, lock)
  elseif ti == "table" then
    n = init.n or #init
    local a = core.shared_new(code, n, true, lock)
    fill(a, fname, init, n, "item")
    return a
  elseif ti == "string" and code == "c" then
    n = #init
    local a = core.shared_new(code, n, true, lock)
    local bytes = { byte(init, 1, -1) }
    fill(a, fname, bytes, n, "byte")
    return a
  end
  argerror(2, fname, "size or list expected, got " ..
           (ti == "number" and tostring(init) or ti), 3)
end

-- mp.Value(type, [init [, {lock=true}]]), mp.RawValue(type, [init]),
-- mp.Array(type, size_or_list [, {lock=true}]), mp.RawArray(type, size_or_list)
for name, new in pairs { Value = new_value, Array = new_array } do
  local raw = "Raw" .. name
  exports[name] = function(t, init, opts)
    local o = new(name, t, init, check_opts(opts, name))
    return o
  end
  exports[raw] = function(t, init)
    local o = new(raw, t, init, false)
    return o
  end
end

return M
