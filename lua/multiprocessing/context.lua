-- multiprocessing.context: start methods and contexts.
--
-- The default start method lives in process.lua (Process:start reads it);
-- this module sets it and makes contexts: tables whose constructors are
-- those of require "multiprocessing" (looked up when first used, so
-- modules that load later are included), with Process and Pool bound to
-- the context's method.

local process = require "multiprocessing.process"
local errors = require "multiprocessing.errors"
local check = require "multiprocessing.check"

local pairs, setmetatable, require = pairs, setmetatable, require

local M = {}
local exports = {}
M.exports = exports

local ALL = process.START_METHODS
local explicitly_set = false

-- (level: as error() in the public function)
local function check_method(m, fname, level)
  if m == nil then check.argerror(1, fname, "start method expected, got nil", level + 1) end
  check.choice(m, ALL, 1, fname, "start method", level + 1)
end

-- mp.set_start_method(m [, force]): once; force=true changes it again
function exports.set_start_method(m, force)
  if m == nil and force then       -- as Python: (None, force=True) resets
    process._set_default_method("fork")
    explicitly_set = false
    return
  end
  check_method(m, "set_start_method", 2)
  if explicitly_set and not force then
    errors.raise("ProcessError", "the start method has already been set to \""
                 .. process._default_method() .. "\" (pass force=true to change it)", 2)
  end
  process._set_default_method(m)
  explicitly_set = true
end

-- mp.get_start_method() -> "fork" | "spawn" | "forkserver"
function exports.get_start_method() return process._default_method() end

-- mp.get_all_start_methods() -> {"fork", "spawn", "forkserver"}
function exports.get_all_start_methods()
  return { ALL[1], ALL[2], ALL[3] }
end

-- mp.set_executable(path): the program spawned children run
function exports.set_executable(path)
  require("multiprocessing.spawn").set_executable(path)
end

-- mp.get_executable() -> path or name of that program
function exports.get_executable()
  return require("multiprocessing.spawn").get_executable()
end

-- mp.set_main_chunk(path | false): the entry chunk spawned children re-run
-- (false: none); by default the script on the interpreter's command line
function exports.set_main_chunk(path)
  require("multiprocessing.spawn").set_main_chunk(path)
end

-- mp.set_forkserver_preload({module names}): what the fork server loads
function exports.set_forkserver_preload(list)
  require("multiprocessing.spawn").set_forkserver_preload(list)
end

-- ---- contexts --------------------------------------------------------------

local contexts = {}

-- a copy of opts (argument 1 of a call to fname: a table or nil)
-- whose start_method is m unless it names one
local function with_method(opts, m, fname)
  check.type(opts, "table", 1, fname, nil, 3)
  local o = {}
  for k, v in pairs(opts or {}) do o[k] = v end
  if o.start_method == nil then o.start_method = m end
  return o
end

local function bind_process(m)
  return function(opts)
    return require("multiprocessing").Process(with_method(opts, m, "Process"))
  end
end

-- Pool workers follow the context's method: the pool is made (and restarts
-- its workers) with that method as the default of its Process objects,
-- through process._with_method, which pool.lua honours.
local function bind_pool(m)
  return function(...)
    return process._with_method(m, require("multiprocessing").Pool, ...)
  end
end

-- The manager's server is started with the context's method; the context
-- may be given as self (ctx:Manager()) or not (ctx.Manager()).
local function bind_manager(m, ctx)
  return function(a, b)
    local opts = a
    if a == ctx then opts = b end
    return require("multiprocessing").Manager(with_method(opts, m, "Manager"))
  end
end

-- mp.get_context([method]) -> a context: ctx.Process{...}, ctx.Pool(n),
-- ctx.Queue(), ... with the method bound; ctx.get_start_method() tells it
function exports.get_context(m)
  if m == nil then m = process._default_method() end
  check_method(m, "get_context", 2)
  if contexts[m] then return contexts[m] end
  local ctx = {
    Process = bind_process(m),
    Pool = bind_pool(m),
    get_start_method = function() return m end,
    _name = m,
  }
  ctx.Manager = bind_manager(m, ctx)
  setmetatable(ctx, {
    __index = function(_, k) return require("multiprocessing")[k] end,
    __tostring = function() return "<Context(" .. m .. ")>" end,
  })
  contexts[m] = ctx
  return ctx
end

return M
