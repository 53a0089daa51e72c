-- multiprocessing.spawn: the spawn start method, both sides: the
-- parent's start and the child's bootstrap, which forkserver children
-- (multiprocessing.forkserver) run too.
--
-- The parent posix_spawns the executable (lua5.4, or what
-- mp.set_executable named) as `exe -e "<bootstrap chunk>"`; the chunk sets
-- package.path/cpath and reads from fd, the child's end of a socketpair,
-- its bootstrap channel (csrc/process.c p:_spawn). Over it the parent sends
-- two messages, as a Connection does (handles' fds ride with SCM_RIGHTS):
--   1. the preparation: package.path, package.cpath, cwd, arg, the entry
--      chunk's path (or false), the parent's pid and name, the executable,
--      the default start method, the fork server's preload list, and the
--      bytecode of the library's Lua modules (the -e chunk preloads them);
--   2. the Process object's fields (target, args, name, daemon, run, ...).
-- The child applies 1, re-runs the entry chunk with mp.is_main() false and
-- Process:start() refused (the guard), then decodes 2 (so functions that
-- travel by name find their modules) and runs the target through the same
-- exit path as a forked child (process.lua's M._child_main).
--
-- This module also keeps the settings both methods share (the executable,
-- the entry chunk, the fork server's preload list) and hands a
-- "forkserver" start to multiprocessing.forkserver, loaded on first use.

local core = require "multiprocessing.core"
local errors = require "multiprocessing.errors"
local process = require "multiprocessing.process"
local check = require "multiprocessing.check"
local codec = require "multiprocessing.codec"

local type, error, pairs, ipairs, tostring, pcall, xpcall, require, loadfile, load =
      type, error, pairs, ipairs, tostring, pcall, xpcall, require, loadfile, load
local unpack = table.unpack
local package, stderr, io_open = package, io.stderr, io.open

local M = {}

local MARK = " --[[multiprocessing spawn]]"  -- MP_SPAWN_MARK; lua.c refuses "-e -..."
M.MARK = MARK
local BOOT_TIMEOUT = 60     -- seconds a child waits for its parent's messages
M.BOOT_TIMEOUT = BOOT_TIMEOUT

local executable            -- nil: the default (see get_executable)
local main_chunk            -- nil: detect; false: none; string: a path
local main_detected
local preload = {}
local bootstrapping = false -- true while a spawned child re-runs the entry chunk

-- ---- settings ----------------------------------------------------------
-- (called by context.lua's exports: level 3 is the user's line)

function M.set_executable(path)
  if type(path) ~= "string" or path == "" then
    check.argerror(1, "set_executable", "non-empty string expected, got "
                   .. (path == "" and "empty string" or check.typename(path)), 3)
  end
  executable = path
end

-- The program spawned children run: what set_executable named, else the
-- running interpreter when it is a Lua interpreter, else lua5.4 on PATH (a
-- host that embeds Lua must name itself: see docs/spawn.md).
function M.get_executable()
  if executable then return executable end
  local exe = core.exepath()
  if exe and exe:match("[^/]*$"):match("^lua") then return exe end
  return "lua5.4"
end

function M.set_main_chunk(path)
  if path ~= false and (type(path) ~= "string" or path == "") then
    check.argerror(1, "set_main_chunk", "path or false expected, got "
                   .. (path == "" and "empty string" or check.typename(path)), 3)
  end
  if path then
    local abs, msg = core.realpath(path)
    if not abs then check.argerror(1, "set_main_chunk", tostring(msg), 3) end
    path = abs
  end
  main_chunk = path
end

-- The entry chunk a spawned child re-runs: set_main_chunk's, else the
-- script given on the interpreter's command line (arg[0]), unless that is
-- busted's runner (re-running it would run the specs) or there is none
-- (lua5.4 -e, standard input, a host that set no arg).
function M.get_main_chunk()
  if main_chunk ~= nil then return main_chunk end
  if main_detected == nil then
    main_detected = false
    local a = _G.arg
    local s = type(a) == "table" and a[0]
    if type(s) == "string" and s ~= "-" and not package.loaded["busted"]
       and not package.loaded["busted.core"] then
      local cwd = process._initial_cwd
      if s:sub(1, 1) ~= "/" and cwd then s = cwd .. "/" .. s end
      main_detected = core.realpath(s) or false
    end
  end
  return main_detected
end

function M.set_forkserver_preload(list)
  if type(list) ~= "table" then
    check.argerror(1, "set_forkserver_preload", "list of module names expected, got "
                   .. check.typename(list), 3)
  end
  local t = {}
  for i, name in ipairs(list) do
    if type(name) ~= "string" then
      check.argerror(1, "set_forkserver_preload", "item " .. i .. " is not a module name", 3)
    end
    t[i] = name
  end
  preload = t
end

-- spawn._preload() -> the fork server's preload list
function M._preload() return preload end

-- ---- the guard -----------------------------------------------------------

local GUARD_MSG = [[
a process was started while a spawned child was re-running the program's
entry chunk to bootstrap itself. The code that starts processes must run
only in the main program: put it under the guard

    if mp.is_main() then
      ... -- start processes, pools, etc. here
    end

(the spawned child re-runs the entry chunk so that its functions, globals
and requires exist, with mp.is_main() false)]]
process._start_guard = function()
  if bootstrapping then errors.raise("ProcessError", GUARD_MSG, 3) end
end

-- ---- the parent's side ---------------------------------------------------

-- A Lua long string that holds s verbatim.
local function quote(s)
  local eq = ""
  while s:find("]" .. eq .. "]", 1, true) do eq = eq .. "=" end
  local nl = s:sub(1, 1) == "\n" and "\n" or ""
  return "[" .. eq .. "[" .. nl .. s .. "]" .. eq .. "]"
end

-- The -e chunk: paths, die with the parent, read the preparation, let the
-- library's modules load from the bytecode it carries (compiling them
-- would cost more than the rest of the start), then spawn.lua goes on.
local BOOT = [[
local core = require 'multiprocessing.core'
core._child_init(%d, %d)
local c = core.conn_from_fd(%d, true, true)
local prep, why = c:recv(%d)
for n, t in pairs(type(prep) == 'table' and prep.lib or {}) do
  package.preload[n] = function(...)
    local f = load(t[2], '@' .. t[1], 'b')
    if f then return f(...) end
    package.preload[n] = nil
    return require(n)
  end
end
require('multiprocessing.spawn')._main(c, prep, why)]]

function M.boot_chunk(fd, ppid)
  return MARK .. " package.path=" .. quote(package.path) .. " package.cpath="
         .. quote(package.cpath) .. "\n" .. BOOT:format(ppid, fd, fd, BOOT_TIMEOUT)
end

-- name -> { path, bytecode } of the library's Lua modules loaded here, made
-- on the first spawn (debug info kept: tracebacks name the files)
local libcode
local function library_bytecode()
  if libcode then return libcode end
  libcode = {}
  local searchpath, dump = package.searchpath, string.dump
  for name in pairs(package.loaded) do
    if name == "multiprocessing" or name:sub(1, 16) == "multiprocessing." then
      local path = searchpath(name, package.path)
      local f = path and loadfile(path)
      if f then libcode[name] = { path, dump(f) } end
    end
  end
  return libcode
end

-- spawn._prep_message(ppid, pname, main, with_lib) -> message 1, the
-- preparation (with_lib: with the library's bytecode)
function M._prep_message(ppid, pname, main, with_lib)
  local a = _G.arg
  local args = {}
  if type(a) == "table" then
    for k, v in pairs(a) do
      if math.type(k) == "integer" and (type(v) == "string" or type(v) == "number") then
        args[k] = v
      end
    end
  end
  return {
    path = package.path, cpath = package.cpath, cwd = core.getcwd(),
    arg = args, main = main, ppid = ppid, pname = pname,
    exe = executable, preload = preload, method = process._default_method(),
    lib = with_lib and library_bytecode() or nil,
    log = require("multiprocessing.log").config(),
  }
end

-- The fields a child needs to rebuild its Process object.
local function payload_of(p)
  local t = {}
  for k, v in pairs(p:_fields()) do
    if k ~= "_method" then t[k] = v end
  end
  return t
end

-- spawn._send_boot(box, prep, payload): send both messages on the
-- bootstrap channel (box: the parent's end), then close it; a child that
-- died early just shows in its exit code.
function M._send_boot(box, prep, payload)
  local conn = core.conn_from_fd(box:_detach(), true, true)
  local ok, err = pcall(function()
    if conn:send(prep) then conn:send(payload) end
  end)
  conn:close()
  if not ok then error(err, 0) end
end

-- spawn._spawn_raw(p, prep, payload): spawn p's child and send it both
-- messages
function M._spawn_raw(p, prep, payload)
  local exe = M.get_executable()
  local pbox, cbox = core._socketpair()
  local argv = { exe, "-e", M.boot_chunk(cbox:fileno(), prep.ppid) }
  p:_spawn(exe, argv, cbox)
  cbox:close()
  M._send_boot(pbox, prep, payload)
end

-- process.lua's start for "spawn" and "forkserver"
function M._start(p, method, ppid, pname)
  local payload = payload_of(p)
  codec.check(payload, "process")    -- raises here, before any child exists
  local prep = M._prep_message(ppid, pname, M.get_main_chunk(), method == "spawn")
  if method == "spawn" then M._spawn_raw(p, prep, payload)
  else require("multiprocessing.forkserver")._start(p, prep, payload) end
end

-- ---- the child's side ----------------------------------------------------

local NO_CHUNK_HINT = "\n(this program has no entry chunk a spawned child could re-run"
  .. " -- lua5.4 -e, standard input, busted or a host that named none -- so only"
  .. " functions that travel as bytecode or from modules can be sent; name one"
  .. " with mp.set_main_chunk(path))"

-- The fork server compiles each entry chunk once, and its children re-run
-- that compiled chunk while the file is the one compiled: the same device,
-- inode, size and modification and change times (a changed file is
-- compiled again, as loadfile would).
local compiled = {}         -- path -> { id =, fn = } (in the fork server)

-- spawn._compile_main(path): compile the entry chunk at path, once (the
-- fork server does, for its children)
function M._compile_main(path)
  if compiled[path] ~= nil then return end
  local id = core._file_id(path)       -- before reading: a later write shows
  local f = id and io_open(path, "rb")
  local src = f and f:read("a")
  if f then f:close() end
  -- as loadfile: a UTF-8 BOM and a first line starting with '#' are
  -- skipped (its newline kept, so line numbers stay right)
  local fn = src and load((src:gsub("^\239\187\191", "", 1):gsub("^#[^\n]*", "", 1)),
                          "@" .. path)
  compiled[path] = fn and { id = id, fn = fn } or false
end

local function compiled_main(path)
  local c = compiled[path]
  if c and core._file_id(path) == c.id then return c.fn end
  return nil
end

-- spawn._run_child(conn [, prep, why]) -> exit code. Runs in the new
-- process (spawned, or forked by the fork server): prepare, re-run the
-- entry chunk, run the target. prep: the preparation if it was read
-- already (spawn's -e chunk), else it is read here.
function M._run_child(conn, prep, why)
  if prep == nil and why == nil then prep, why = conn:recv(BOOT_TIMEOUT) end
  if not prep then
    stderr:write("multiprocessing: spawned child ", core.getpid(),
                 ": no bootstrap message (", tostring(why), ")\n")
    return 1
  end
  -- a fork server's child has most of these already: what is written is
  -- only what differs (each page a forked child writes is copied first)
  if package.path ~= prep.path then package.path = prep.path end
  if package.cpath ~= prep.cpath then package.cpath = prep.cpath end
  if prep.cwd then core.chdir(prep.cwd) end
  require "multiprocessing"            -- every handle kind can be rebuilt
  require("multiprocessing.log").configure(prep.log)
  if process.exports.is_main() then process._set_spawned_child(true) end
  if prep.exe and executable ~= prep.exe then executable = prep.exe end
  if process.METHODS[prep.method] and process._default_method() ~= prep.method then
    process._set_default_method(prep.method)
  end
  preload = prep.preload or {}
  _G.arg = prep.arg
  if main_chunk ~= prep.main then main_chunk = prep.main end
  if prep.main then
    local chunk, msg = compiled_main(prep.main)
    if not chunk then chunk, msg = loadfile(prep.main) end
    if not chunk then
      stderr:write("multiprocessing: spawned child cannot load the entry chunk: ",
                   tostring(msg), "\n")
      return 1
    end
    bootstrapping = true
    local ok, err = xpcall(chunk, process._traceback, unpack(prep.arg, 1, #prep.arg))
    bootstrapping = false
    if not ok then
      stderr:write("multiprocessing: error while a spawned child (pid ", core.getpid(),
                   ") re-ran the entry chunk ", prep.main, ":\n", tostring(err), "\n")
      return 1
    end
  end
  local ok, fields, why2 = pcall(conn.recv, conn, BOOT_TIMEOUT)
  conn:close()
  if not ok or fields == nil then
    local msg = ok and ("no process message (" .. tostring(why2) .. ")") or tostring(fields)
    if not prep.main then msg = msg .. NO_CHUNK_HINT end
    stderr:write("multiprocessing: spawned child ", core.getpid(),
                 " cannot receive its process: ", msg, "\n")
    return 1
  end
  local self = core.process_new(fields)
  self:_become(prep.ppid)
  return process._child_main(self, prep.ppid, prep.pname, core.getppid() ~= prep.ppid)
end

-- The bootstrap chunk's entry: never returns.
function M._main(conn, prep, why)
  local ok, code = pcall(M._run_child, conn, prep, why or (prep == nil and "closed") or nil)
  if not ok then
    stderr:write("multiprocessing: spawned child failed: ", tostring(code), "\n")
    code = 1
  end
  core._exit(type(code) == "number" and code or 1)
end

-- Stop the fork server, if one was started (tests, and programs that want
-- it gone early).
function M._forkserver_stop()
  local fs = package.loaded["multiprocessing.forkserver"]
  if fs then fs._stop() end
end

return M
