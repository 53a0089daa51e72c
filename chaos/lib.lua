-- The chaos trial files' side of chaos/run.lua (require "chaos.lib", run
-- from the top of the tree, as make chaos does).
--
-- A trial file is run as `lua5.4 chaos/<family>.lua <method> <n> <seed>`
-- (by run.lua, under timeout(1), which puts it in a process group of its
-- own). Its main block calls M.batch(trial, bound): each of the n trials
-- runs in a forked "trial process" that the batch joins with a bound (a
-- trial past it is a hang: its whole tree is killed). After each trial the
-- batch looks for processes left in its group (every process a trial
-- starts, by any start method, stays in the group: the library never
-- changes it) and for new /dev/shm entries, kills what it finds, and prints
-- one line per trial:
--   trial <k> <lost> <dup> <hangs> <crashes> <procs> <fds> <inflight>
-- then "end". The trial function itself returns its counts (see FIELDS).
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local M = {}

M.now = core.monotonic

function M.sleep(s)
  if s > 0 then core.poll({}, s) end
end

-- What a trial counts, in the order of the batch's lines and of the shared
-- array a trial process writes them into.
local FIELDS = { "lost", "dup", "hangs", "crashes", "procs", "fds", "inflight" }
M.FIELDS = FIELDS

-- /proc/<pid>/stat: comm, state, ppid, pgrp, starttime (nil if gone).
function M.stat(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return nil end
  local s = f:read("l")
  f:close()
  if not s then return nil end
  local comm, rest = s:match("^%d+ %((.*)%) (.*)$")
  if not rest then return nil end
  local t, i = {}, 0
  for w in rest:gmatch("%S+") do
    i = i + 1
    t[i] = w
    if i >= 20 then break end
  end
  return { pid = pid, comm = comm, state = t[1], ppid = tonumber(t[2]),
           pgrp = tonumber(t[3]), start = tonumber(t[20]) }
end

-- Every process of the machine, as M.stat tables. The ls that lists /proc
-- has exited before any stat file is read, so it is never among them.
function M.procs()
  local p = io.popen("ls /proc")
  local pids = {}
  for l in p:lines() do
    local n = tonumber(l)
    if n then pids[#pids + 1] = n end
  end
  p:close()
  local t = {}
  for _, pid in ipairs(pids) do
    local s = M.stat(pid)
    if s then t[#t + 1] = s end
  end
  return t
end

-- Descendants of root (zombies included), as M.stat tables.
function M.descendants(root)
  local kids = {}
  for _, s in ipairs(M.procs()) do
    kids[s.ppid] = kids[s.ppid] or {}
    table.insert(kids[s.ppid], s)
  end
  local out, todo = {}, { root }
  while #todo > 0 do
    local pid = table.remove(todo)
    for _, s in ipairs(kids[pid] or {}) do
      out[#out + 1] = s
      todo[#todo + 1] = s.pid
    end
  end
  return out
end

-- Live (not zombie) processes of process group pgrp, but those in except.
-- Zombies are left out: an orphan's zombie waits for init, whose business
-- that is (and which, on some machines, reaps late).
function M.group(pgrp, except)
  local t = {}
  for _, s in ipairs(M.procs()) do
    if s.pgrp == pgrp and s.state ~= "Z" and not except[s.pid] then t[#t + 1] = s end
  end
  return t
end

function M.kill_all(list)
  for _, s in ipairs(list) do pcall(core.kill, s.pid, 9) end
end

-- Wait up to timeout seconds for f() to return an empty list; returns the
-- last list.
function M.settle(f, timeout)
  local deadline = M.now() + timeout
  local t = f()
  while #t > 0 and M.now() < deadline do
    M.sleep(0.02)
    t = f()
  end
  return t
end

-- Open fds of this process: their number and what they are (fd -> link
-- target). Listed twice, keeping what both lists show: the listing's own
-- pipe (a new one each time, sometimes both of its ends) drops out.
local function fd_list()
  local p = io.popen("ls -l /proc/" .. core.getpid() .. "/fd 2>/dev/null")
  local what = {}
  for l in p:lines() do
    local fd, target = l:match("(%d+) %-> (.*)$")
    if fd then what[tonumber(fd)] = target end
  end
  p:close()
  return what
end

function M.fds()
  local a, b = fd_list(), fd_list()
  local n, what = 0, {}
  for fd, target in pairs(a) do
    if b[fd] == target then n = n + 1; what[fd] = target end
  end
  return n, what
end

-- Names in /dev/shm (the library makes none: its segments are memfds).
function M.shm()
  local p = io.popen("ls -A /dev/shm 2>/dev/null")
  local t = {}
  for l in p:lines() do t[l] = true end
  p:close()
  return t
end

-- A trial's start: the start method, and what its end compares with.
function M.trial_begin(method)
  mp.set_start_method(method, true)
  collectgarbage(); collectgarbage()
  local n, what = M.fds()
  return { method = method, fds = n, fdset = what }
end

-- A trial's end, after it joined and closed what it made: returns leaked
-- processes and leaked fds. Leaked processes are zombie children (ones
-- the library never reaped: a killed fork server is one until the next
-- start by forkserver looks at it), then, once the fork server is stopped
-- (it is the library's, started on first use, and lives until the program
-- ends), any descendant still there.
function M.trial_end(t)
  collectgarbage(); collectgarbage()
  local me = core.getpid()
  local function zombies()
    local z = {}
    for _, s in ipairs(M.descendants(me)) do
      if s.state == "Z" and s.ppid == me then z[#z + 1] = s end
    end
    return z
  end
  local z = M.settle(zombies, 0.5)
  if #z > 0 then
    io.stderr:write(("chaos: %s %s: %d zombie children\n"):format(arg[0], t.method, #z))
  end
  if t.method == "forkserver" then
    require("multiprocessing.spawn")._forkserver_stop()
  end
  local seen = {}
  for _, s in ipairs(z) do seen[s.pid] = true end
  local left = M.settle(function()
    local l = {}
    for _, s in ipairs(M.descendants(me)) do
      if not seen[s.pid] then l[#l + 1] = s end
    end
    return l
  end, 2)
  M.kill_all(left)
  collectgarbage(); collectgarbage()
  local n, what = M.fds()
  local fds = n - t.fds
  if fds > 0 then
    local new = {}
    for fd, target in pairs(what) do
      if t.fdset[fd] ~= target then new[#new + 1] = fd .. " " .. target end
    end
    table.sort(new)
    io.stderr:write(("chaos: %s %s: fds left open: %s\n"):format(arg[0], t.method,
      table.concat(new, ", ")))
  end
  return #z + #left, fds > 0 and fds or 0
end

-- A trial's body between the two: body() returns the counts; what it made
-- is garbage once it returned (it closes what it can anyway).
function M.measured(method, body)
  local t = M.trial_begin(method)
  local r = body()
  local procs, fds = M.trial_end(t)
  r.procs, r.fds = (r.procs or 0) + procs, (r.fds or 0) + fds
  return r
end

-- Run fn() in a forked process for at most secs seconds: "ok" when it
-- returned true, "failed" when it returned something else or raised,
-- "hang" when it was still running (it is killed), "crash" when a signal
-- ended it.
function M.bounded(secs, fn, ...)
  local p = mp.Process{ start_method = "fork", target = function(...)
    local ok, v = pcall(fn, ...)
    if not ok then io.stderr:write("chaos: ", tostring(v), "\n") end
    os.exit(ok and v == true and 0 or 1, false)
  end, args = table.pack(...) }
  p:start()
  local code = p:join(secs)
  if code == nil then
    p:kill()
    p:join(5)
  end
  p:close()
  return code == nil and "hang" or code == 0 and "ok" or code < 0 and "crash" or "failed"
end

-- Kill pid and all its descendants.
function M.kill_tree(pid)
  pcall(core.kill, pid, 19)       -- SIGSTOP: it starts no more while we look
  M.kill_all(M.descendants(pid))  -- (what they start dies with them: PDEATHSIG)
  pcall(core.kill, pid, 9)
end

local function my_pgrp()
  return M.stat(core.getpid()).pgrp
end

-- The batch: run trial(method, k, seed) in a forked process for k = 1..n,
-- each joined within bound seconds. trial returns a table of FIELDS counts.
function M.batch(trial, bound)
  local method, n, seed, variant = arg[1], tonumber(arg[2]), tonumber(arg[3]), arg[4]
  assert(method and n and seed, "usage: lua5.4 chaos/<family>.lua method n seed [variant]")
  local label = arg[0] .. " " .. method .. (variant and " " .. variant or "")
  local me = core.getpid()
  local pgrp = my_pgrp()
  local except = { [me] = true, [M.stat(me).ppid] = true }
  io.write("group ", pgrp, "\n")
  io.flush()
  local out = mp.RawArray("int64", #FIELDS)
  for k = 1, n do
    for i = 1, #FIELDS do out[i] = 0 end
    local shm0 = M.shm()
    local p = mp.Process{ start_method = "fork", name = "trial-" .. k, target = function()
      math.randomseed(seed, k)
      local ok, r = xpcall(M.measured, debug.traceback, method, function()
        return trial(method, k, variant)
      end)
      if ok then
        for i, f in ipairs(FIELDS) do out[i] = r[f] or 0 end
      else           -- what it started must not keep it from leaving
        io.stderr:write("chaos: ", label, " trial ", k, " raised: ", tostring(r), "\n")
        M.kill_all(M.descendants(core.getpid()))
      end
      io.stdout:flush()
      io.stderr:flush()
      os.exit(ok and 0 or 3, false)
    end }
    p:start()
    local code = p:join(bound)
    local r = {}
    for i, f in ipairs(FIELDS) do r[f] = out[i] end
    if code == nil then
      io.stderr:write(("chaos: %s trial %d: no end after %d s, killed\n"):format(
        label, k, bound))
      r.hangs = r.hangs + 1
      M.kill_tree(p.pid)
      p:join(10)
    elseif code ~= 0 then
      io.stderr:write(("chaos: %s trial %d: the trial process %s\n"):format(
        label, k, code < 0 and "died of signal " .. -code or "exited with code " .. code))
      r.crashes = r.crashes + 1
    end
    if p:is_alive() then p:kill(); p:join(5) end
    p:close()
    -- what outlived the trial process
    local left = M.settle(function() return M.group(pgrp, except) end, 2)
    if #left > 0 then
      local names = {}
      for _, s in ipairs(left) do names[#names + 1] = s.pid .. " " .. s.comm end
      io.stderr:write(("chaos: %s trial %d: left behind: %s\n"):format(
        label, k, table.concat(names, ", ")))
    end
    r.procs = r.procs + #left
    M.kill_all(left)
    for name in pairs(M.shm()) do
      if not shm0[name] then
        io.stderr:write(("chaos: new /dev/shm entry %s\n"):format(name))
        r.fds = r.fds + 1
      end
    end
    local line = { "trial", k }
    for _, f in ipairs(FIELDS) do line[#line + 1] = r[f] end
    io.write(table.concat(line, " "), "\n")
    io.flush()
  end
  out:close()
  io.write("end\n")
  io.flush()
end

return M
