-- Helpers shared by the specs: leak checks (fds, child processes) and
-- bounded waits. Every spec that starts processes wraps itself with
-- helpers.leakcheck() so that nothing it started outlives it.
local H = {}

local function listdir(path)
  local p = io.popen("ls -1 " .. path .. " 2>/dev/null")
  local t = {}
  for l in p:lines() do t[#t + 1] = l end
  p:close()
  return t
end

local function mypid()
  local f = assert(io.open("/proc/self/stat"))
  local pid = f:read("*l"):match("^(%d+)")
  f:close()
  return tonumber(pid)
end
H.mypid = mypid

-- Open fds of this process (popen's own fds excluded by counting twice).
function H.fds()
  local f = {}
  local p = io.popen("ls -1 /proc/" .. mypid() .. "/fd")
  -- ls runs in a child; it lists our fds, including popen's pipe end
  for l in p:lines() do f[#f + 1] = tonumber(l) end
  p:close()
  table.sort(f)
  return f
end

-- How many fds this process has open: the least of a few looks, since a
-- look may also catch the ends of popen's own pipe while it starts ls.
function H.fd_count()
  local n = math.huge
  for _ = 1, 3 do n = math.min(n, #H.fds()) end
  return n
end

-- Pids of live (non-zombie) processes whose parent is this process (or
-- the process pid), ignoring the helper commands this file itself runs.
function H.children(pid)
  local me = tostring(pid or mypid())
  local kids = {}
  for _, d in ipairs(listdir("/proc")) do
    if d:match("^%d+$") then
      local f = io.open("/proc/" .. d .. "/stat")
      if f then
        local s = f:read("*l") or ""
        f:close()
        local comm, state, ppid = s:match("^%d+ %((.*)%) (%S) (%d+)")
        if ppid == me and state ~= "Z" and comm ~= "ls" and comm ~= "sh" then
          kids[#kids + 1] = tonumber(d)
        end
      end
    end
  end
  return kids
end

-- Wait until pred() is true, up to timeout seconds; returns pred's value.
function H.wait_until(pred, timeout)
  local core = require "multiprocessing.core"
  local deadline = core.monotonic() + (timeout or 5)
  local v = pred()
  while not v and core.monotonic() < deadline do
    os.execute("sleep 0.01")
    v = pred()
  end
  return v
end

-- Snapshot fds and children; the returned function asserts both are back
-- to the snapshot (after a GC and a short grace period for exits).
function H.snapshot()
  local fds0 = #H.fds()
  return function()
    collectgarbage(); collectgarbage()
    local ok = H.wait_until(function()
      return #H.children() == 0 and #H.fds() <= fds0
    end, 5)
    if not ok then
      error(string.format("leak: %d children %s, fds %d -> %d",
        #H.children(), table.concat(H.children(), ","), fds0, #H.fds()), 2)
    end
  end
end

-- In a describe block: before_each/after_each that check for leaks.
-- busted's functions live in the spec's environment, not in _G: take them
-- from the calling block's _ENV.
function H.leakcheck()
  local f, env = debug.getinfo(2, "f").func, _G
  for i = 1, math.huge do
    local name, v = debug.getupvalue(f, i)
    if not name then break end
    if name == "_ENV" then env = v break end
  end
  local check
  env.before_each(function() check = H.snapshot() end)
  env.after_each(function() check() end)
end

-- Values a channel must carry exactly, ending with long (a long string):
-- integers at both ends, floats (-0.0 and inf too), booleans, strings with
-- a NUL. NaN is not among them: send 0 / 0 apart, check it with H.exact.
function H.scalars(long)
  return { 0, -1, math.maxinteger, math.mininteger, 1.5, -0.0, 1 / 0,
           false, true, "", "a\0b", long }
end

-- Assert that r is v as a channel must give it back: equal and of the
-- same math.type, or a NaN for a NaN.
function H.exact(v, r)
  local assert = require "luassert"
  if v ~= v then
    assert.is_true(r ~= r)
  else
    assert.are.equal(v, r)
    assert.are.equal(math.type(v), math.type(r))
  end
end

-- A table with a shared reference and a cycle in it, and the assertion
-- that r is a copy of one that kept both.
function H.cyclic()
  local shared = { 1, 2 }
  local t = { x = shared, y = shared, list = { "a", "b", { deep = true } } }
  t.self = t
  return t
end

function H.same_cyclic(r)
  local assert = require "luassert"
  assert.are.equal(r.x, r.y)
  assert.are.equal(r, r.self)
  assert.are.same({ 1, 2 }, r.x)
  assert.is_true(r.list[3].deep)
end

-- Assert that the free lock l (a Lock or a manager's Lock proxy) locks:
-- acquire takes it, a second acquire fails at once and after a wait,
-- release frees it.
function H.lock_once(l)
  local assert = require "luassert"
  assert.is_false(l:locked())
  assert.is_true(l:acquire())
  assert.is_true(l:locked())
  assert.is_false(l:acquire(0))
  assert.is_false(l:acquire(0.05))
  l:release()
  assert.is_false(l:locked())
end

-- Path of a temporary file name unique to this process.
local tmpn = 0
function H.tmpname(tag)
  tmpn = tmpn + 1
  return string.format("/tmp/mp-spec-%d-%d-%s", mypid(), tmpn, tag or "x")
end

-- Start a child by start method m (nil: the default) running fn(...);
-- its exit code is what fn returns (an integer) or 0; an error exits 1.
-- It never returns into busted (the library's exit path).
function H.start_by(m, fn, ...)
  local mp = require "multiprocessing"
  local Process = m and mp.get_context(m).Process or mp.Process
  local p = Process{ target = function(...)
    local code = fn(...)
    os.exit(math.type(code) == "integer" and code or 0, false)
  end, args = table.pack(...) }
  p:start()
  return p
end

-- Run fn(...) in a child set to die at the queue's crash point point
-- (core._test.queue_crash: it exits 9 there), and assert that it did.
function H.crash_at(point, fn, ...)
  local assert = require "luassert"
  local p = H.start(function(...)
    require("multiprocessing.core")._test.queue_crash(point)
    return fn(...)
  end, ...)
  assert.are.equal(9, H.finish(p, 10))
end

-- H.start_by with the default start method.
function H.start(fn, ...)
  return H.start_by(nil, fn, ...)
end

-- Join p (killing it if it has not ended within timeout seconds, default
-- 30), close it and return its exit code (nil if it had to be killed).
function H.finish(p, timeout)
  local code = p:join(timeout or 30)
  if code == nil then p:kill(); p:join(5) end
  p:close()
  return code
end

-- Sleep s seconds (a timed wait on a private Event: no shell).
function H.sleep(s)
  local mp = require "multiprocessing"
  local e = mp.Event()
  e:wait(s)
  e:close()
end

-- SIGINT in a blocked wait. Start a forked child running body(ready);
-- body calls ready() just before the wait it blocks in. Once it has, and
-- the child has had settle seconds (default 0.1) to block, send it SIGINT
-- (p:interrupt()) and join it for at most 10 s, less than the waits the
-- specs block in (a wait that ignores the signal shows as nil). Returns its
-- exit code (nil: it was still waiting; it is killed then). Under lua5.4 (which runs busted here) SIGINT sets a hook
-- that raises "interrupted!": the child's wait must let it run. The child
-- leaves as the library's exit path does after an error (exit hooks run,
-- daemonic children terminated, the others joined; code 1), but only when
-- the error is that one (else code 5; 0 if body returned), and without the
-- path's report on stderr.
function H.interrupt_wait(body, settle)
  local mp = require "multiprocessing"
  local ready = mp.Event()
  local p = mp.Process{ target = function()
    local ok, err = pcall(body, function() ready:set() end)
    require("multiprocessing.process")._exit_function()
    local interrupted = type(err) == "string" and err:find("interrupted!$") ~= nil
    os.exit(ok and 0 or interrupted and 1 or 5, false)
  end }
  p:start()
  assert(ready:wait(10), "the child did not reach its wait")
  H.sleep(settle or 0.1)
  p:interrupt()
  local code = p:join(10)
  if code == nil then p:kill(); p:join(5) end
  p:close()
  ready:close()
  return code
end

-- The child's side of H.nop_signals: install the test handler that raises
-- nothing (core._test.nop_signal(true)), set go, and return what
-- wait(0.5) returns; raise unless the signals during it left it taking
-- 0.5 to 3 s.
function H.nop_timed_wait(go, wait)
  local core = require "multiprocessing.core"
  core._test.nop_signal(true)
  go:set()
  local t0 = core.monotonic()
  local r = table.pack(wait(0.5))
  local dt = core.monotonic() - t0
  if dt < 0.5 or dt > 3 then error(("the timed wait took %.2f s"):format(dt)) end
  return table.unpack(r, 1, r.n)
end

-- Run Lua source in a fresh lua5.4 (with this tree on the paths) and
-- return its output (stdout and stderr together) and its exit code;
-- prefix: shell words run before it (e.g. "ulimit -n 64;").
function H.run_lua(src, timeout, prefix)
  local script = H.tmpname("script.lua")
  local f = assert(io.open(script, "w"))
  f:write(src)
  f:close()
  -- the child finds the modules where this process found them
  local p = io.popen(string.format("%s LUA_PATH=%q LUA_CPATH=%q timeout %d lua5.4 %s 2>&1; echo \"exit:$?\"",
                                   prefix or "", package.path, package.cpath, timeout or 30, script))
  local out = p:read("a")
  p:close()
  os.remove(script)
  local code = tonumber(out:match("exit:(%d+)\n?$"))
  return out:gsub("exit:%d+\n?$", ""), code
end

-- H.run_lua(src, timeout, prefix), asserting that src printed "ok" and
-- nothing else, and exited 0.
function H.run_ok(src, timeout, prefix)
  local assert = require "luassert"
  local out, code = H.run_lua(src, timeout, prefix)
  assert.are.equal(0, code, out)
  assert.are.equal("ok\n", out)
end

-- A redis-server of our own on a Unix socket in dir (default: a new
-- temporary directory): {dir=, sock=, url=, cli=, stop=}; r.cli() connects
-- to it, r.stop(keep) stops it and removes dir unless keep. aof: with an
-- append-only file (fsync always) in dir.
function H.start_redis(aof, dir)
  local core = require "multiprocessing.core"
  local redis = require "multiprocessing.redis"
  dir = dir or H.tmpname("redis")
  os.execute("mkdir -p " .. dir)
  local sock = dir .. "/s"
  local cmd = ("redis-server --port 0 --unixsocket %s --dir %s --save '' --daemonize yes " ..
               "--pidfile %s/pid --logfile %s/log --appendonly %s --appendfsync always")
              :format(sock, dir, dir, dir, aof and "yes" or "no")
  assert(os.execute(cmd))
  local r = { dir = dir, sock = sock, url = "unix://" .. sock }
  function r.cli()
    return assert(redis.connect{ path = sock, timeout = 5 })
  end
  function r.stop(keep)
    local f = io.open(dir .. "/pid")
    local pid = f and tonumber(f:read("l"))
    if f then f:close() end
    if pid then
      core.kill(pid, 15)
      H.wait_until(function()
        local st = io.open("/proc/" .. pid .. "/stat")
        if st then st:close() end
        return st == nil
      end, 10)
    end
    if not keep then os.execute("rm -rf " .. dir) end
  end
  if not H.wait_until(function()
    local c = redis.connect{ path = sock, timeout = 2 }
    if c and c:command("PING") == "PONG" then c:close() return true end
    if c then c:close() end
    return false
  end, 10) then
    r.stop()                              -- leave no server behind
    error("redis-server did not answer PING within 10 s", 2)
  end
  return r
end

-- A copy of the shared-memory segment behind fd in a memfd that is not
-- sealed (core._test.shm_unsealed): a forged handle's segment. Returns it
-- boxed (close it, or let <close> do it).
function H.forge_unsealed(fd)
  local core = require "multiprocessing.core"
  local forged = core._fdbox(core._test.shm_unsealed(0))
  local src = assert(io.open("/proc/self/fd/" .. fd, "rb"))
  local dst = assert(io.open("/proc/self/fd/" .. forged:fileno(), "r+b"))
  dst:write(src:read("a"))
  src:close(); dst:close()
  return forged
end

-- The parent's side of a "handler that raises nothing" spec: once the
-- child p has set go (its test handler installed, core._test.nop_signal
-- (true), and about to wait 0.5 s with a timeout), send it the handler's
-- signal 5 times during that wait, let the wait run out, then 5 times more
-- during its next, untimed wait (which the caller then satisfies).
function H.nop_signals(p, go)
  local core = require "multiprocessing.core"
  local sig = core._test.nop_signal()
  assert(go:wait(10), "the child did not reach its wait")
  for _ = 1, 5 do H.sleep(0.04) core.kill(p.pid, sig) end
  H.sleep(0.6)
  for _ = 1, 5 do H.sleep(0.02) core.kill(p.pid, sig) end
end

return H
