-- multiprocessing.spawn: the spawn and forkserver start methods, both
-- sides: the parent's start, the child's bootstrap and the fork server.
--
-- spawn: the parent posix_spawns the executable (lua5.4, or what
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
-- forkserver: a server spawned on first use (the entry chunk is not
-- re-run in it, it only loads the library and the preload modules) that
-- listens on a socketpair only its creator holds. For each child the
-- creator sends the child's end of a new bootstrap socketpair; the server
-- hands it to the child it forked ahead (or forks one then), the child
-- runs the same bootstrap as a spawned one on that socket, and the server
-- answers with the child's pid, a pidfd (signals) and the read end of a
-- status pipe on which it writes the exit code once it reaped the child
-- (csrc/process.c p:_attach). The server dies with its creator
-- (PDEATHSIG), its children with it.

local core = require "multiprocessing.core"
local errors = require "multiprocessing.errors"
local process = require "multiprocessing.process"

local type, error, pairs, ipairs, tostring, pcall, xpcall, require, loadfile, select =
      type, error, pairs, ipairs, tostring, pcall, xpcall, require, loadfile, select
local unpack = table.unpack
local package, stderr = package, io.stderr

local M = {}

local MARK = " --[[multiprocessing spawn]]"  -- MP_SPAWN_MARK; lua.c refuses "-e -..."
M.MARK = MARK
local BOOT_TIMEOUT = 60     -- seconds a child waits for its parent's messages

local executable            -- nil: the default (see get_executable)
local main_chunk            -- nil: detect; false: none; string: a path
local main_detected
local preload = {}
local bootstrapping = false -- true while a spawned child re-runs the entry chunk
local compiled_main         -- (defined with the fork server's cache)

local function perr(msg, level)
  error(errors.new("ProcessError", msg), (level or 1) + 1)
end

-- ---- settings ----------------------------------------------------------

function M.set_executable(path)
  if type(path) ~= "string" or path == "" then
    error("bad argument #1 to 'set_executable' (non-empty string expected, got "
          .. type(path) .. ")", 3)
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
    error("bad argument #1 to 'set_main_chunk' (path or false expected, got "
          .. type(path) .. ")", 3)
  end
  if path then
    local abs, msg = core.realpath(path)
    if not abs then error("set_main_chunk: " .. tostring(msg), 3) end
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
    error("bad argument #1 to 'set_forkserver_preload' (list of module names expected, got "
          .. type(list) .. ")", 3)
  end
  local t = {}
  for i, name in ipairs(list) do
    if type(name) ~= "string" then
      error("bad argument #1 to 'set_forkserver_preload' (item " .. i
            .. " is not a module name)", 3)
    end
    t[i] = name
  end
  preload = t
end

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
  if bootstrapping then perr(GUARD_MSG, 3) end
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

local function prep_message(ppid, pname, main, with_lib)
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

-- Send both messages on the bootstrap channel, then close it; a child that
-- died early just shows in its exit code.
local function send_boot(box, prep, payload)
  local conn = core.conn_from_fd(box:_detach(), true, true)
  local ok, err = pcall(function()
    if conn:send(prep) then conn:send(payload) end
  end)
  conn:close()
  if not ok then error(err, 0) end
end

local function spawn_raw(p, prep, payload)
  local exe = M.get_executable()
  local pbox, cbox = core._socketpair()
  local argv = { exe, "-e", M.boot_chunk(cbox:fileno(), prep.ppid) }
  p:_spawn(exe, argv, cbox)
  cbox:close()
  send_boot(pbox, prep, payload)
end

-- ---- forkserver: the creator's side --------------------------------------

local server   -- { conn = Connection, proc = Process, owner = pid }

-- Forget the server: close our end of its socket and reap it, killed if it
-- still runs (it did not answer), so that no dead server stays a zombie.
-- Its children die with it (PDEATHSIG). A server inherited from the
-- process we were forked from is that process's: only forgotten.
local function reap_server(proc)
  if proc:is_alive() then proc:kill() end
  if proc:join(5) then proc:close() end
end

local function drop_server()
  local s = server
  server = nil
  if not s or s.owner ~= core.getpid() then return end
  pcall(s.conn.close, s.conn)
  reap_server(s.proc)
end

local function get_server()
  if server and server.owner == core.getpid() and server.proc:is_alive() then return server end
  drop_server()
  local me = core.getpid()
  local mine, theirs = core.Pipe(true)
  local proc = core.process_new({ name = "ForkServer", daemon = true, args = {} })
  local prep = prep_message(me, process.exports.current_process().name, false, true)
  local ok, err = pcall(spawn_raw, proc, prep, { name = "ForkServer", daemon = true,
                        target = M._forkserver_main, args = { theirs, preload } })
  theirs:close()
  if not ok then
    mine:close()
    if proc.pid then reap_server(proc) end   -- it started, then its messages failed
    perr("forkserver: the fork server could not be started: "
         .. (type(err) == "table" and tostring(err.message) or tostring(err)), 4)
  end
  server = { conn = mine, proc = proc, owner = me }
  return server
end

-- Read the server's answer to a request made on s: always read it, to keep
-- in step. A signal's error in this wait (Ctrl-C) comes out once the answer
-- is read and the child attached (the server answers within a fork's time).
local function read_answer(p, s)
  local rok, rep = pcall(s.conn.recv, s.conn, BOOT_TIMEOUT)
  if rok then return rep end
  if not core._is_interrupt(rep) then drop_server() error(rep, 0) end
  local again, rep2 = pcall(s.conn.recv, s.conn, BOOT_TIMEOUT)
  if again and type(rep2) == "table" and rep2.pid then
    p:_attach(rep2.pid, rep2.status, rep2.pidfd)
  else
    drop_server()
  end
  error(rep, 0)
end

-- The boot messages are written while the server hands the socket to a
-- child (the socket keeps them for it); then the server's answer makes p a
-- started process. A server that does not answer (killed, or dead of its
-- own) is reaped and replaced, and the start tried once more with the new
-- one.
local function forkserver_start(p, prep, payload)
  for _ = 1, 2 do
    local s = get_server()
    local pbox, cbox = core._socketpair()
    local ok = s.conn:send({ cbox, main = prep.main })
    cbox:close()
    local sent, err = true, nil
    if ok then sent, err = pcall(send_boot, pbox, prep, payload) else pbox:close() end
    local rep = ok and read_answer(p, s)
    if type(rep) == "table" and rep.pid then
      p:_attach(rep.pid, rep.status, rep.pidfd)
      if not sent then error(err, 0) end   -- the child, without its messages, exits 1
      return
    end
    if type(rep) == "table" then          -- it answered: the fork failed there
      perr("forkserver: " .. tostring(rep.error), 3)
    end
    drop_server()
  end
  perr("forkserver: the fork server died and did not answer its replacement either", 3)
end

-- process.lua's start for "spawn" and "forkserver"
function M._start(p, method, ppid, pname)
  local payload = payload_of(p)
  core.dumps(payload, "process")     -- raises here, before any child exists
  local prep = prep_message(ppid, pname, M.get_main_chunk(), method == "spawn")
  if method == "spawn" then spawn_raw(p, prep, payload)
  else forkserver_start(p, prep, payload) end
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

local function compile_main(path)
  if compiled[path] ~= nil then return end
  local id = core._file_id(path)       -- before reading: a later write shows
  local f = id and io.open(path, "rb")
  local src = f and f:read("a")
  if f then f:close() end
  -- as loadfile: a UTF-8 BOM and a first line starting with '#' are
  -- skipped (its newline kept, so line numbers stay right)
  local fn = src and load((src:gsub("^\239\187\191", "", 1):gsub("^#[^\n]*", "", 1)),
                          "@" .. path)
  compiled[path] = fn and { id = id, fn = fn } or false
end

compiled_main = function(path)
  local c = compiled[path]
  if c and core._file_id(path) == c.id then return c.fn end
  return nil
end

-- Runs in the new process: prepare, re-run the entry chunk, run the
-- target. Returns the exit code. prep: the preparation if it was read
-- already (spawn's -e chunk), else it is read here.
local function run_child(conn, prep, why)
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
  local ok, code = pcall(run_child, conn, prep, why or (prep == nil and "closed") or nil)
  if not ok then
    stderr:write("multiprocessing: spawned child failed: ", tostring(code), "\n")
    code = 1
  end
  core._exit(type(code) == "number" and code or 1)
end

-- ---- forkserver: the server ------------------------------------------

local SERVER_GC_PAUSE = 400   -- percent (see _forkserver_main)

-- The server's loop (the target of its Process): hand each request to a
-- child, report each child's exit code on its status pipe.
--
-- The server keeps one child forked ahead, "warm": it waits on a channel of
-- its own for the bootstrap socket of a request. A request is answered at
-- once with the warm child, and the next warm child is forked after the
-- answer, while the creator goes on: a start does not wait for a fork nor
-- for the new process to be first scheduled. The server's state does not
-- change once it has started (it compiles entry chunks only, and a child
-- compiles a chunk the server has not), so a child forked ahead is the
-- child a fork on request would make. A warm child that died unused is
-- reaped, and a request finding none is served by a fork on the spot.
function M._forkserver_main(conn, mods)
  core._sigint(true)         -- Ctrl-C is for the program, not its server
  for _, name in ipairs(mods or {}) do
    local ok, err = pcall(require, name)
    if not ok then
      stderr:write("multiprocessing: forkserver cannot preload ", name, ": ",
                   tostring(err), "\n")
    end
  end
  -- The collector of a fresh interpreter waits until the heap has doubled
  -- (pause 200) before a cycle. The server waits until it has grown
  -- fourfold: a child forked in the middle of a cycle would go on with it,
  -- writing to (so copying) the page of every object it marks; forked in
  -- the pause, it starts far from its first cycle. A child gets the
  -- server's pause back (its entry chunk, re-run, may set its own).
  local child_pause = collectgarbage("setpause", SERVER_GC_PAUSE)
  local kids = {}            -- Process -> status write box
  local warm                 -- { p = Process, chan = its socket, r =, w = status pipe }
  -- In a new child: the collector's pause and Ctrl-C back, and the
  -- server's fds closed (the creator's socket, the siblings' status pipes
  -- and pidfds, and the ones given).
  local function drop_server_fds(...)
    collectgarbage("setpause", child_pause)
    core._sigint(false)
    conn:close()
    for p, w in pairs(kids) do        -- the siblings' fds are the server's
      w:close()
      getmetatable(p).__close(p)      -- not our child: frees our copy only
    end
    for i = 1, select("#", ...) do select(i, ...):close() end
  end
  local function child_boot(box, r, w)
    drop_server_fds(r, w)
    return run_child(core.conn_from_fd(box:_detach(), true, true))
  end
  local function warm_boot(chan, mine, r, w)
    drop_server_fds(mine, r, w)
    local box = core._recv_fd(chan)  -- nil: the server closed it (it leaves)
    chan:close()
    if not box then return 0 end
    return run_child(core.conn_from_fd(box:_detach(), true, true))
  end
  -- the answer to the creator: child p started, its status on pipe end r
  local function answer(p, r, w)
    local sig = p.sentinel and core._dup(p.sentinel)   -- no pidfd: kill(pid)
    kids[p] = w
    conn:send({ pid = p.pid, status = r, pidfd = sig })
    if sig then sig:close() end
    r:close()
  end
  local function fork_one(box)
    local p = core.process_new({ name = "forkserver-child" })
    local r, w = core._pipe()
    local ok, err = pcall(p._fork, p, child_boot, box, r, w)
    box:close()
    if ok then
      answer(p, r, w)
    else
      r:close(); w:close()
      conn:send({ error = tostring(err) })
    end
  end
  local function drop_warm()           -- unused: close its channel, reap it
    local wc = warm
    warm = nil
    wc.chan:close()                    -- end of file: it returns 0
    if not wc.p:join(1) then wc.p:kill(); wc.p:join() end
    wc.p:close(); wc.r:close(); wc.w:close()
  end
  local function fork_warm()
    local p = core.process_new({ name = "forkserver-child" })
    local mine, theirs = core._socketpair()
    local r, w = core._pipe()
    core._malloc_settle()              -- in the server, not in every child
    local ok = pcall(p._fork, p, warm_boot, theirs, mine, r, w)
    theirs:close()
    if ok then warm = { p = p, chan = mine, r = r, w = w }
    else mine:close(); r:close(); w:close() end   -- requests fork on the spot
  end
  local function serve(req)
    local wc = warm
    if wc and wc.p:is_alive() and core._send_fd(wc.chan, req[1]) then
      warm = nil
      wc.chan:close()
      req[1]:close()
      answer(wc.p, wc.r, wc.w)
    else
      if wc then drop_warm() end
      fork_one(req[1])
    end
    fork_warm()
  end
  local function reap(p)
    local code = p:join(0)
    if code then
      core._status_write(kids[p], code)
      kids[p]:close()
      kids[p] = nil
      p:close()
    end
  end
  fork_warm()
  while true do
    -- wait on the creator's socket, the children's pidfds and the warm
    -- child's; without pidfds (old kernels, valgrind) look at the children
    -- now and then
    local fds, list, blind = { conn:fileno() }, { false }, false
    for p in pairs(kids) do
      local fd = p.sentinel
      if fd then fds[#fds + 1] = fd; list[#list + 1] = p else blind = true end
    end
    if warm and warm.p.sentinel then fds[#fds + 1] = warm.p.sentinel; list[#list + 1] = warm end
    local hits = core.poll(fds, blind and 0.02 or nil)
    for _, i in ipairs(hits) do
      local what = list[i]
      if i == 1 then
        local req, why = conn:recv(0)
        if req == nil and why == "closed" then
          if warm then drop_warm() end
          return 0
        end
        if type(req) == "table" and req[1] then
          if type(req.main) == "string" then compile_main(req.main) end
          serve(req)
        end
      elseif what == warm then
        drop_warm()                    -- it died unused; the next request forks one
      elseif what and kids[what] then
        reap(what)
      end
    end
    if blind then
      for p in pairs(kids) do if not p.sentinel then reap(p) end end
    end
  end
end

-- Stop the fork server (tests, and programs that want it gone early).
function M._forkserver_stop()
  if server and server.owner == core.getpid() then
    server.conn:close()              -- end of file: it leaves (drop_server reaps it)
    server.proc:join(5)
  end
  drop_server()
end

return M
