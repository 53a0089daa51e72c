-- multiprocessing.forkserver: the forkserver start method, both sides:
-- the creator's start and the server.
--
-- The server is a spawned process of the library (spawn.lua starts it,
-- the entry chunk is not re-run in it: it only loads the library and the
-- preload modules) that listens on a socketpair only its creator holds.
-- For each child the creator sends the child's end of a new bootstrap
-- socketpair; the server hands it to the child it forked ahead (or forks
-- one then), the child runs the same bootstrap as a spawned one on that
-- socket (spawn._run_child), and the server answers with the child's pid,
-- a pidfd (signals) and the read end of a status pipe on which it writes
-- the exit code once it reaped the child (csrc/process.c p:_attach). The
-- server dies with its creator (PDEATHSIG), its children with it
-- (docs/design.md, decisions 5 and 8).

local core = require "multiprocessing.core"
local errors = require "multiprocessing.errors"
local log = require "multiprocessing.log"
local process = require "multiprocessing.process"
local spawn = require "multiprocessing.spawn"

local type, error, pairs, ipairs, tostring, pcall, require, select, getmetatable =
      type, error, pairs, ipairs, tostring, pcall, require, select, getmetatable
local stderr = io.stderr

local M = {}

local BOOT_TIMEOUT = spawn.BOOT_TIMEOUT

-- ---- the creator's side --------------------------------------------------

local server   -- { conn = Connection, proc = Process, owner = pid }

-- Forget the server: close our end of its socket and reap it, killed if it
-- still runs (it did not answer), so that no dead server stays a zombie.
-- Its children die with it (PDEATHSIG). A server inherited from the
-- process we were forked from is that process's: only forgotten.
local function reap_server(proc)
  if proc:is_alive() then proc:kill() end
  local code = proc:join(5)
  if code then proc:close() end
  if log.enabled("INFO") then
    log.info("fork server (pid %s) stopped%s", tostring(proc.pid),
             code and (", exit code " .. code) or "")
  end
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
  local prep = spawn._prep_message(me, process.exports.current_process().name, false, true)
  local ok, err = pcall(spawn._spawn_raw, proc, prep, { name = "ForkServer", daemon = true,
                        target = M._main, args = { theirs, spawn._preload() } })
  theirs:close()
  if not ok then
    mine:close()
    if proc.pid then reap_server(proc) end   -- it started, then its messages failed
    errors.raise("ProcessError", "forkserver: the fork server could not be started: "
                 .. (type(err) == "table" and tostring(err.message) or tostring(err)), 3)
  end
  server = { conn = mine, proc = proc, owner = me }
  if log.enabled("INFO") then log.info("fork server started (pid %d)", proc.pid) end
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

-- forkserver._start(p, prep, payload): spawn.lua's start for "forkserver".
-- The boot messages are written while the server hands the socket to a
-- child (the socket keeps them for it); then the server's answer makes p a
-- started process. A server that does not answer (killed, or dead of its
-- own) is reaped and replaced, and the start tried once more with the new
-- one.
function M._start(p, prep, payload)
  for _ = 1, 2 do
    local s = get_server()
    local pbox, cbox = core._socketpair()
    local ok = s.conn:send({ cbox, main = prep.main })
    cbox:close()
    local sent, err = true, nil
    if ok then sent, err = pcall(spawn._send_boot, pbox, prep, payload) else pbox:close() end
    local rep = ok and read_answer(p, s)
    if type(rep) == "table" and rep.pid then
      p:_attach(rep.pid, rep.status, rep.pidfd)
      if not sent then error(err, 0) end   -- the child, without its messages, exits 1
      return
    end
    if type(rep) == "table" then          -- it answered: the fork failed there
      errors.raise("ProcessError", "forkserver: " .. tostring(rep.error), 2)
    end
    drop_server()
  end
  errors.raise("ProcessError",
               "forkserver: the fork server died and did not answer its replacement either", 2)
end

-- ---- the server ------------------------------------------------------------

local SERVER_GC_PAUSE = 400   -- percent (see M._main)

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
function M._main(conn, mods)
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
    return spawn._run_child(core.conn_from_fd(box:_detach(), true, true))
  end
  local function warm_boot(chan, mine, r, w)
    drop_server_fds(mine, r, w)
    local box = core._recv_fd(chan)  -- nil: the server closed it (it leaves)
    chan:close()
    if not box then return 0 end
    return spawn._run_child(core.conn_from_fd(box:_detach(), true, true))
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
          if type(req.main) == "string" then spawn._compile_main(req.main) end
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

-- forkserver._stop(): stop the fork server (spawn._forkserver_stop, for
-- tests and programs that want it gone early)
function M._stop()
  if server and server.owner == core.getpid() then
    server.conn:close()              -- end of file: it leaves (drop_server reaps it)
    server.proc:join(5)
  end
  drop_server()
end

return M
