-- multiprocessing.check: the argument checks every Lua module uses.
--
-- Misuse raises a plain string (docs/design.md, decision 11), in one
-- form, Lua's own (luaL_argerror's):
--
--   bad argument #1 to 'Queue' (maxsize must be an integer >= 0, got -1)
--   bad argument #2 to 'Pipe' (boolean expected, got string)
--   bad argument #1 to 'Pool' ('processes' must be an integer in 1..4096, got 0)
--   bad argument #3 to 'map' (unknown option 'chunksise')
--
-- n is the argument's position; for a method it does not count self, as
-- in Lua's C functions (pool:map(fn, xs, opts): opts is #3). An option of
-- an option table names itself in quotes inside the parentheses. A value
-- shows as itself when it is a number, else as its type (or its class's
-- __name).
--
-- Levels: each check takes the level that error() would take in the
-- function that calls the check, 2 by default (that function's caller:
-- the user's line when the caller is the public function). A check must
-- not be tail-called (`return check.x(...)`): the tail call would drop
-- the public function's frame and the message would point one line off.
--
-- The rules, as the C core's: an integer may be given as a float with an
-- integral value (2.0 is 2, as luaL_checkinteger takes it) and comes back
-- as an integer; a timeout is nil (wait forever) or a number >= 0, not
-- NaN, and is refused with the C core's words (mp_opttimeout).

local type, error, tostring, pairs, getmetatable, setmetatable =
      type, error, tostring, pairs, getmetatable, setmetatable
local math_type, tointeger, concat = math.type, math.tointeger, table.concat

local M = {}

-- check.typename(v) -> the __name of v's metatable, else type(v)
function M.typename(v)
  local mt = getmetatable(v)
  local name = type(mt) == "table" and mt.__name
  return type(name) == "string" and name or type(v)
end

-- check.callable(v) -> true for a function or a value with __call
function M.callable(v)
  if type(v) == "function" then return true end
  local mt = getmetatable(v)
  return type(mt) == "table" and mt.__call ~= nil
end

local typename, callable = M.typename, M.callable

-- How a wrong value shows in a message: a number as itself (unless only
-- its type was wrong), anything else as its type.
local function shown(v, by_type)
  if type(v) == "number" and not by_type then return tostring(v) end
  return typename(v)
end

local function article(desc)
  return (desc:find("^[aeiou]") and "an " or "a ") .. desc
end

-- "what must be a desc, got v", or "desc expected, got v" without what
-- (by_type: desc is a type, so v shows as its type)
local function wrong(what, desc, v, by_type)
  if what then return what .. " must be " .. article(desc) .. ", got " .. shown(v, by_type) end
  return desc .. " expected, got " .. shown(v, by_type)
end

-- check.argerror(n, fname, msg [, level]): raise
-- "bad argument #n to 'fname' (msg)"
function M.argerror(n, fname, msg, level)
  error("bad argument #" .. n .. " to '" .. fname .. "' (" .. msg .. ")", (level or 2) + 1)
end
local argerror = M.argerror

-- check.nargs(count, max, fname [, level]): raise if count, the number of
-- arguments given (select("#", ...)), is more than max
function M.nargs(count, max, fname, level)
  if count > max then
    argerror(max + 1, fname, "no value expected", (level or 2) + 1)
  end
end

-- The types check.type and check.options know: Lua's names, and
-- "callable" (a function or a value with __call).
local function has_type(v, tname)
  if tname == "callable" then return callable(v) end
  return type(v) == tname
end

-- check.type(v, tname, n, fname [, what [, level]]) -> v; nil passes
function M.type(v, tname, n, fname, what, level)
  if v ~= nil and not has_type(v, tname) then
    argerror(n, fname, wrong(what, tname, v, true), (level or 2) + 1)
  end
  return v
end

-- check.integer(v, n, fname, what, min [, max [, level]]) -> v as an
-- integer (nil passes): an integer, or a float with an integral value,
-- in min..max (max nil: no upper bound)
function M.integer(v, n, fname, what, min, max, level)
  if v == nil then return nil end
  local i = math_type(v) == "integer" and v or (type(v) == "number" and tointeger(v))
  if not i or i < min or (max and i > max) then
    local desc = max and ("integer in " .. min .. ".." .. max) or ("integer >= " .. min)
    argerror(n, fname, wrong(what, desc, v), (level or 2) + 1)
  end
  return i
end

-- check.number(v, n, fname, what, min [, level]) -> v: a number >= min,
-- not NaN (nil passes)
function M.number(v, n, fname, what, min, level)
  if v ~= nil and not (type(v) == "number" and v >= min) then
    argerror(n, fname, wrong(what, "number >= " .. min, v), (level or 2) + 1)
  end
  return v
end

-- check.positive(v, n, fname, what [, level]) -> v: a number > 0 (nil passes)
function M.positive(v, n, fname, what, level)
  if v ~= nil and not (type(v) == "number" and v > 0) then
    argerror(n, fname, wrong(what, "number > 0", v), (level or 2) + 1)
  end
  return v
end

-- check.timeout(v, n, fname [, level]) -> v: nil or a number >= 0
function M.timeout(v, n, fname, level)
  if v ~= nil and not (type(v) == "number" and v >= 0) then
    argerror(n, fname, "timeout must be a number >= 0", (level or 2) + 1)
  end
  return v
end

-- check.choice(v, list, n, fname [, what [, level]]) -> v: one of list's
-- strings (nil passes)
function M.choice(v, list, n, fname, what, level)
  if v == nil then return nil end
  for i = 1, #list do
    if v == list[i] then return v end
  end
  local q = {}
  for i = 1, #list do q[i] = '"' .. list[i] .. '"' end
  local alts = #q > 1 and concat(q, ", ", 1, #q - 1) .. " or " .. q[#q] or q[1]
  argerror(n, fname, (what or "value") .. " must be " .. alts .. ", got " ..
           (type(v) == "string" and v or shown(v)), (level or 2) + 1)
end

local NONE = setmetatable({}, { __newindex = function() error("read-only table", 2) end })

-- check.options(opts, n, fname, allowed [, level]) -> opts, or an empty
-- read-only table for nil. allowed: option name -> true (any value) or a
-- type name that a present value must have (see check.type).
function M.options(opts, n, fname, allowed, level)
  level = (level or 2) + 1
  if opts == nil then return NONE end
  if type(opts) ~= "table" then
    argerror(n, fname, wrong(nil, "table", opts, true), level)
  end
  for k, v in pairs(opts) do
    local want = allowed[k]
    if not want then
      argerror(n, fname, "unknown option '" .. tostring(k) .. "'", level)
    elseif want ~= true and not has_type(v, want) then
      argerror(n, fname, wrong("'" .. k .. "'", want, v, true), level)
    end
  end
  return opts
end

return M
