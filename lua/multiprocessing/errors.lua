-- multiprocessing.errors: the error objects every part raises.
--
-- An error object is a table {type=, message=, traceback=, pid=} whose
-- metatable is its class. Classes form a small hierarchy as in Python
-- (TimeoutError is a ProcessError); Class:is(err) tests membership.
-- Errors cross processes as plain data and are rebuilt here by type name.

local setmetatable, getmetatable, type, tostring, rawget, pairs, error =
      setmetatable, getmetatable, type, tostring, rawget, pairs, error
local concat = table.concat

local M = {}
local classes = {}
local exports = {}   -- what require "multiprocessing" shows: the classes
M.exports = exports

local Error   -- the root class, made below

local function tostring_error(e)
  local parts = { e.type .. ": " .. tostring(e.message) }
  if e.pid then parts[#parts + 1] = " (in process " .. tostring(e.pid) .. ")" end
  if e.traceback and e.traceback ~= "" then
    parts[#parts + 1] = "\n" .. e.traceback
  end
  return concat(parts)
end

-- Class:is(err) -> boolean: err is an error object of this class or a subclass.
local function is(class, err)
  if type(err) ~= "table" then return false end
  local c = getmetatable(err)
  while c do
    if c == class then return true end
    c = rawget(c, "super")
  end
  return false
end

-- Class(message [, fields]) or Class:new(message [, fields]) -> error object
local function new(class, message, fields)
  local e = { type = class.name, message = message }
  if fields then
    for k, v in pairs(fields) do if e[k] == nil then e[k] = v end end
  end
  return setmetatable(e, class)
end

local function class(name, super)
  local c = { name = name, super = super, is = is, new = new,
              __tostring = tostring_error }
  c.__index = c
  setmetatable(c, { __call = new, __index = super,
                    __tostring = function() return "<class " .. name .. ">" end })
  classes[name] = c
  M[name] = c
  exports[name] = c
  return c
end

Error = class("Error")
local ProcessError = class("ProcessError", Error)
class("TimeoutError", ProcessError)
class("AuthenticationError", ProcessError)
class("BufferTooShort", ProcessError)
class("RemoteError", Error)
class("WorkerLostError", ProcessError)
class("SerializationError", Error)
class("BrokenBarrierError", Error)
class("CancelledError", Error)        -- a pool task cancelled before it started
class("OSError", Error)               -- a system call failed: its errno in err.errno

-- errors.new(type, message [, fields]) -> error object of the class named
-- type (an unknown name gives a plain Error carrying that type).
function M.new(typename, message, fields)
  local c = classes[typename]
  local e = new(c or Error, message, fields)
  e.type = typename
  return e
end

-- errors.raise(type, message [, level [, fields]]): raise errors.new's
-- object; level as error() would take it in the caller (an error object
-- gets no position, but a message handler may look at the level)
function M.raise(typename, message, level, fields)
  level = level or 1
  error(M.new(typename, message, fields), level > 0 and level + 1 or 0)
end

-- errors.from_data(t) -> error object rebuilt from its fields (as sent by
-- another process).
function M.from_data(t)
  return M.new(t.type or "Error", t.message,
               { traceback = t.traceback, pid = t.pid, errno = t.errno })
end

-- errors.to_data(err) -> a plain table that any transport can carry
function M.to_data(e, pid, traceback)
  if type(e) == "table" and getmetatable(e) and is(Error, e) then
    return { type = e.type, message = e.message,
             traceback = e.traceback or traceback, pid = e.pid or pid, errno = e.errno }
  end
  return { type = "Error", message = tostring(e), traceback = traceback, pid = pid }
end

M.is_error = function(e) return is(Error, e) end

return M
