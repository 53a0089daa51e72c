-- multiprocessing.log: the library's logger (mp.get_logger,
-- mp.log_to_stderr, mp.set_logger), in the manner of Python's
-- multiprocessing.util logger, with LuaLogging's method names so that code
-- written for a LuaLogging logger takes this one, and a LuaLogging logger
-- can take the library's records (mp.set_logger).
--
-- Cheap when quiet: the library calls M.debug/M.info/... only after
-- M.enabled(level), one comparison, so a program that never logs pays no
-- formatting. A record is one write(2) of one line (io.stderr is
-- unbuffered and a line is far below PIPE_BUF), so lines from many
-- processes on one terminal or pipe never interleave mid-line.
--
-- Inheritance: a forked child has its parent's logger as it was at the
-- fork. A spawned child gets the level and whether stderr output was on
-- (M.config / M.configure, carried by the spawn bootstrap); a logger set
-- with mp.set_logger lives in one process and its forked children.

local format, concat, select, type, tostring =
      string.format, table.concat, select, type, tostring
local stderr = io.stderr
local check = require "multiprocessing.check"

local M = {}
local exports = {}
M.exports = exports

-- LuaLogging's levels, in order; Python's "WARNING" and "CRITICAL" are
-- accepted as WARN and FATAL, and "OFF" silences.
local RANK = { DEBUG = 1, INFO = 2, WARN = 3, WARNING = 3, ERROR = 4,
               FATAL = 5, CRITICAL = 5, OFF = 6 }
local NAME = { "DEBUG", "INFO", "WARN", "ERROR", "FATAL", "OFF" }

local rank = RANK.WARN          -- records below this rank are dropped
local to_stderr = false         -- log_to_stderr() was called
local target                    -- a logger given to mp.set_logger, or nil

-- (level 3: the caller of fn)
local function level_rank(level, fn)
  local r = type(level) == "string" and RANK[level:upper()]
  if not r then
    check.argerror(1, fn, "level must be DEBUG, INFO, WARN, ERROR, FATAL or OFF, got "
                   .. (type(level) == "string" and level or check.typename(level)), 3)
  end
  return r
end

-- The record's text, as LuaLogging builds it: a format string with
-- arguments, a function that returns the text, or any value (tostring).
local function text(fmt, ...)
  if type(fmt) == "string" then
    if select("#", ...) > 0 then return format(fmt, ...) end
    return fmt
  elseif type(fmt) == "function" then
    return tostring(fmt(...))
  end
  return tostring(fmt)
end

local function process_tag()
  -- loaded late: multiprocessing.process requires this module
  local process = package.loaded["multiprocessing.process"]
  local core = package.loaded["multiprocessing.core"]
  local name = process and process.exports.current_process().name or "MainProcess"
  return name, core and core.getpid() or 0
end

local function emit(r, fmt, ...)
  if r < rank then return end
  if target then
    local method = target[NAME[r]:lower()]
    if method then return method(target, fmt, ...) end
    return
  end
  if not to_stderr then return end
  local name, pid = process_tag()
  stderr:write(concat({ "[", NAME[r], "/", name, " ", pid, "] ", text(fmt, ...), "\n" }))
end

-- For the library's modules: is a record of this level wanted?
function M.enabled(level) return RANK[level] >= rank and (to_stderr or target ~= nil) end

-- The logger object: LuaLogging's methods.
local logger = {}
for r = 1, 5 do
  local r_ = r
  local fn = function(...) return emit(r_, ...) end
  M[NAME[r]:lower()] = fn
  logger[NAME[r]:lower()] = function(_, ...) return emit(r_, ...) end
end
M.warning = M.warn
logger.warning = logger.warn
logger.critical = logger.fatal

-- logger:setLevel(level): as LuaLogging (Python's names accepted too);
-- a logger given to set_logger keeps its own level as well
function logger:setLevel(level)                    -- luacheck: ignore self
  rank = level_rank(level, "setLevel")
end
-- logger:getLevel() -> "DEBUG" | "INFO" | "WARN" | "ERROR" | "FATAL" | "OFF"
function logger:getLevel() return NAME[rank] end   -- luacheck: ignore self
-- logger:log(level, fmt, ...)
function logger:log(level, ...)                    -- luacheck: ignore self
  return emit(level_rank(level, "log"), ...)
end
setmetatable(logger, {
  __index = function(_, k) if k == "level" then return NAME[rank] end end,
  __tostring = function()
    return format("<multiprocessing logger, level %s%s>", NAME[rank],
                  target and ", to a logger" or to_stderr and ", to stderr" or "")
  end,
})

-- mp.get_logger() -> the library's logger (level WARN, silent until
-- log_to_stderr or set_logger gives it somewhere to write)
function exports.get_logger() return logger end

-- mp.log_to_stderr([level]) -> logger: records become lines
-- "[LEVEL/ProcessName pid] message" on stderr
function exports.log_to_stderr(level)
  if level ~= nil then rank = level_rank(level, "log_to_stderr") end
  to_stderr, target = true, nil
  return logger
end

-- mp.set_logger(l) -> l: the library's records go to l (a LuaLogging
-- logger or anything with debug/info/warn/error/fatal methods); nil
-- goes back to the library's own
function exports.set_logger(l)
  if l ~= nil and (type(l) ~= "table" and type(l) ~= "userdata" or not l.warn) then
    check.argerror(1, "set_logger", "a logger with debug/info/warn/error/fatal methods "
                   .. "expected, got " .. check.typename(l))
  end
  if l == logger then l = nil end
  target = l
  return l or logger
end

-- What a spawned child needs to log as its parent does.
function M.config() return { level = NAME[rank], stderr = to_stderr } end
function M.configure(c)
  if type(c) ~= "table" then return end
  rank = RANK[c.level] or rank
  to_stderr = c.stderr == true
end

return M
