-- multiprocessing.process: the Process class (a C userdata, csrc/process.c)
-- with start and run added here, the process registry and the exit path.
--
-- Exit rules (docs/design.md, decision 4): a child runs its target under xpcall,
-- runs the exit hooks (queues flush, its own children are handled as below),
-- then leaves through core._exit. The main program, at its normal end,
-- terminates daemonic children and joins the others (as Python does).
--
-- Start methods: start() forks here; under "spawn" and "forkserver" it
-- hands the object to multiprocessing.spawn (loaded on first use), whose
-- child ends in M._child_main, the same exit path as a forked child.

local core = require "multiprocessing.core"
local errors = require "multiprocessing.errors"
local log = require "multiprocessing.log"
local check = require "multiprocessing.check"
local polling = require "multiprocessing.polling"

local type, error, pairs, tostring, setmetatable, xpcall, pcall =
      type, error, pairs, tostring, setmetatable, xpcall, pcall
local unpack, traceback = table.unpack, debug.traceback
local stderr = io.stderr

local M = {}
local exports = {}
M.exports = exports

local methods = core.Process_methods
local counter = 0
local children = {}        -- started, not yet reaped children: Process -> true
local hooks = {}           -- exit hooks, run in order
local current, parent      -- current process object, parent descriptor
local spawned_child = false
local default_method = "fork"  -- set by multiprocessing.context
local START_METHODS = { "fork", "spawn", "forkserver" }   -- the list, in order
local METHODS = { fork = true, spawn = true, forkserver = true }
M.METHODS, M.START_METHODS = METHODS, START_METHODS

-- The process's authkey: 32 random bytes, made by the main process the
-- first time a process is made or the key is asked for (before any child
-- exists, so every child inherits the same), as Python's.
local function new_authkey()
  local f = assert(io.open("/dev/urandom", "rb"))
  local key = f:read(32)
  f:close()
  return key
end

-- The main process as seen by current_process() in it.
local MainProcess = setmetatable({
  name = "MainProcess", daemon = false, exitcode = nil,
  is_alive = function() return true end,
}, {
  __index = function(t, k)
    if k == "pid" or k == "ident" then return core.getpid() end
    if k == "authkey" then
      local key = new_authkey()
      rawset(t, "authkey", key)
      return key
    end
  end,
  __tostring = function() return "<_MainProcess(MainProcess, started)>" end,
})

local PROCESS_OPTS = { target = "callable", args = "table", name = "string",
                       daemon = "boolean", run = "function", start_method = true }

-- (level 3: the caller of mp.Process)
local function check_opts(opts)
  opts = check.options(opts, 1, "Process", PROCESS_OPTS, 3)
  check.choice(opts.start_method, START_METHODS, 1, "Process", "'start_method'", 3)
  return opts
end

-- mp.Process{target=fn, args={...}, name=s, daemon=b, run=fn,
--   start_method=m} -> Process; without start_method it takes the default
--   method when it starts (p._method tells the one it was given)
-- process._new(fields) -> Process: one made of fields already checked (the
-- Pool's workers), counted as mp.Process counts them
function M._new(fields)
  counter = counter + 1
  if fields.authkey == nil then fields.authkey = (current or MainProcess).authkey end
  return core.process_new(fields)
end

function exports.Process(opts)
  opts = check_opts(opts)
  local daemon = opts.daemon
  if daemon == nil then daemon = current ~= nil and current.daemon or false end
  return M._new({
    target = opts.target,
    args = opts.args or {},
    name = opts.name or ("Process-" .. (counter + 1)),
    daemon = daemon,
    run = opts.run,
    _method = opts.start_method,
  })
end

-- p:run(): target(unpack(args)) in the calling process
function methods.run(self)
  local target = self.target
  if target then
    local args = self.args
    return target(unpack(args, 1, args.n or #args))
  end
end

-- Run every exit hook, then terminate daemonic children and join the others.
local function exit_function()
  for i = 1, #hooks do pcall(hooks[i]) end
  for p in pairs(children) do
    if p.daemon and p._state == "started" then p:terminate() end
  end
  for p in pairs(children) do
    pcall(p.join, p)
    children[p] = nil
  end
end
M._exit_function = exit_function

-- Message handler for a child's target: the error with the traceback of
-- the child's own frames (the parent's frames below the fork are cut).
function M._traceback(err)
  local msg = err
  if type(err) ~= "string" and not (type(err) == "table" and getmetatable(err)
                                    and getmetatable(err).__tostring) then
    msg = "(error object is a " .. type(err) .. " value)"
  end
  local tb = traceback(tostring(msg), 2)
  local cut = tb:find("\n\t%[C%]: in function 'xpcall'")
  if cut then tb = tb:sub(1, cut - 1) end
  return tb
end

-- The child's side of start, called by _fork in the child (or by
-- spawn.lua in a spawned one), which then leaves with the code returned.
-- Under forkserver the parent is not the OS parent (the server is): its
-- liveness is asked with signal 0 (it outlives us: we die with the server,
-- the server with it, so its pid cannot have been reused while we run).
local function bootstrap(self, ppid, pname, not_os_parent)
  current = self
  local function alive(p)
    if not_os_parent then return core.kill(p.pid, 0) == true end
    return core.getppid() == p.pid
  end
  parent = setmetatable({ pid = ppid, name = pname }, {
    __index = { is_alive = alive },
    __tostring = function(p) return "<_ParentProcess(" .. p.name .. ", " .. p.pid .. ")>" end,
  })
  children = {}
  hooks = {}
  local code = 0
  local ok, err = xpcall(self.run, M._traceback, self)
  if not ok then
    code = 1
    stderr:write("Process ", tostring(self.name), " (pid ", tostring(core.getpid()),
                 "):\n", tostring(err), "\n")
  end
  exit_function()
  if log.enabled("DEBUG") then log.debug("process exiting with exit code %d", code) end
  return code       -- _fork's child side flushes and _exits with it
end
M._child_main = bootstrap

-- The object whose __gc runs the exit function at the main program's end.
-- It is made anew at each start, so that it is finalized before the
-- Process objects it must still join (Lua finalizes in reverse order).
local guard
local function arm_exit_guard()
  if guard then getmetatable(guard).__gc = nil end
  guard = setmetatable({}, { __gc = function() exit_function() end })
end

-- p:join([timeout]) -> exitcode | nil, "timeout"; a joined child leaves
-- the registry, so its sentinel is freed with the object.
local c_join = methods.join
function methods.join(self, timeout)
  local code, why = c_join(self, timeout)
  if code then
    if children[self] and log.enabled("INFO") then
      if code < 0 then
        log.info("process %s (pid %d) ended by signal %d", self.name, self.pid, -code)
      else
        log.info("process %s (pid %d) exited with code %d", self.name, self.pid, code)
      end
    end
    children[self] = nil
    return code
  end
  return nil, why
end

-- The polling protocol of cqueues (p:pollfd(), p:events(), p:timeout())
-- and p:fileno() for luv: readable once the process ended (its sentinel).
-- Without a pidfd (old kernels, valgrind) pollfd is nil and timeout()
-- asks to be looked at again every 20 ms (0 once it ended). close()
-- cancels a polled sentinel in cqueues (multiprocessing.polling).
local function sentinel_of(self, level)
  local st = self._state
  if st == "initial" then error("cannot poll a process that was not started", level + 1) end
  if st == "closed" then error("process object is closed", level + 1) end
  return self.sentinel
end
function methods.pollfd(self) return polling.remember(self, sentinel_of(self, 2)) end
methods.events = polling.events
polling.cancel_on_close(methods, core.classes.Process)
function methods.timeout(self)
  if self.sentinel == nil and self._state ~= "closed" then return self:is_alive() and 0.02 or 0 end
end
function methods.fileno(self)
  local fd = sentinel_of(self, 2)
  if not fd then error("process has no sentinel (no pidfd on this kernel)", 2) end
  return fd
end

-- Start each process of list (p:start() for each). Forks are made back to
-- back: a fork write-protects every page of the parent, which then copies
-- each page it writes, again after each fork; the bookkeeping waits until
-- all are started. If a start fails, the ones before it stay started and
-- registered, and the error is raised.
local function start_all(list, level)
  if M._start_guard then M._start_guard() end
  if current and current.daemon then
    errors.raise("ProcessError", "daemonic processes are not allowed to have children", level + 1)
  end
  for i = 1, #list do
    if list[i]._state ~= "initial" then
      errors.raise("ProcessError", "cannot start a process twice", level + 1)
    end
  end
  local me = current or MainProcess
  local ppid, pname = core.getpid(), me.name
  for p in pairs(children) do          -- forget what has ended
    if p._state ~= "started" or not p:is_alive() then children[p] = nil end
  end
  -- Several forks: the C allocator's small free chunks merged once here,
  -- not in each child (glibc merges them at the first large allocation,
  -- writing to every free chunk's page, and a forked child copies each
  -- page it writes). For one fork it is a wash.
  if #list > 1 then core._malloc_settle() end
  local ok, err, n = true, nil, 0
  for i = 1, #list do
    local p = list[i]
    local method = p._method or default_method
    if method == "fork" then
      ok, err = pcall(p._fork, p, bootstrap, p, ppid, pname)
    else
      ok, err = pcall(require("multiprocessing.spawn")._start, p, method, ppid, pname)
    end
    if not ok then break end
    n = i
  end
  -- a start that raised after its child was made (a Ctrl-C while the fork
  -- server answered, a spawned child's boot messages that failed) still
  -- leaves a started child: it is registered too, so that the exit path
  -- reaps it
  if not ok then
    for i = n + 1, #list do
      if list[i]._state == "started" then n = i end
    end
  end
  for i = 1, n do
    if list[i]._state == "started" then children[list[i]] = true end
  end
  if n > 0 then arm_exit_guard() end
  if log.enabled("INFO") then
    for i = 1, n do
      local p = list[i]
      if p._state == "started" then
        log.info("process %s started (pid %d, %s)", p.name, p.pid, p._method or default_method)
      end
    end
  end
  if not ok then error(err, 0) end
end

-- p:start()
function methods.start(self)
  start_all({ self }, 2)
end

-- process._start_all(list): start every process of list (see start_all)
function M._start_all(list) start_all(list, 2) end

-- mp.current_process() -> the calling process's Process object
function exports.current_process() return current or MainProcess end

-- mp.parent_process() -> the parent's descriptor, nil in the main process
function exports.parent_process() return parent end

-- mp.active_children() -> list of live children (finished ones are reaped)
function exports.active_children()
  local t = {}
  for p in pairs(children) do
    if p._state == "started" and p:is_alive() then t[#t + 1] = p
    else children[p] = nil end
  end
  return t
end

exports.cpu_count = core.cpu_count

-- mp.freeze_support(), mp.allow_connection_pickling(): accepted and do
-- nothing, for code ported from Python (there is nothing to freeze, and
-- connections always travel as handles)
function exports.freeze_support() end
function exports.allow_connection_pickling() end

-- mp.is_main() -> false in a spawned child (which re-runs the entry chunk)
function exports.is_main() return not spawned_child end

-- process._atexit(fn): run fn in a child's exit path and at the main
-- program's normal end (before children are joined).
function M._atexit(fn) hooks[#hooks + 1] = fn end
function M._set_spawned_child(v) spawned_child = v end
function M._set_default_method(m) default_method = m end
-- the working directory when the library was loaded: spawn.lua finds a
-- relative arg[0] from it even if the program changed directory since
M._initial_cwd = core.getcwd()
function M._default_method() return default_method end

-- process._with_method(m, fn, ...): call fn with m as the default start
-- method of the Process objects it makes (restored afterwards, even on
-- error); ctx.Pool uses it, and a Pool keeps M._default_method() of its
-- construction for the workers it restarts.
function M._with_method(m, fn, ...)
  local old = default_method
  default_method = m
  local res = table.pack(pcall(fn, ...))
  default_method = old
  if not res[1] then error(res[2], 0) end
  return unpack(res, 2, res.n)
end


return M
