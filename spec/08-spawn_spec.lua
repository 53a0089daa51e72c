-- Start methods (fork, spawn, forkserver), contexts, the guard, programs
-- without an entry chunk, the fork server, embedding.
--
-- busted's own entry chunk must never be re-run, so the cases that need
-- one run in fresh interpreters (H.run_lua): each script prints key=value
-- lines that the spec checks; each is run once per start method.
local H = require "helpers"
local mp = require "multiprocessing"
local METHODS = { "fork", "spawn", "forkserver" }

-- Run body (Lua source) in a fresh lua5.4 with this tree's paths and the
-- given start method set; returns a table of its key=value lines, the whole
-- output and the exit code.
local function run(method, body, timeout)
  local src = ("package.path = %q\npackage.cpath = %q\n"
               .. "local mp = require 'multiprocessing'\n"
               .. "mp.set_start_method(%q)\n"):format(package.path, package.cpath, method)
              .. body
  local out, code = H.run_lua(src, timeout or 30)
  local kv = {}
  for k, v in out:gmatch("([%w_]+)=([^\t\n]*)") do kv[k] = v end
  return kv, out, code
end

-- Run a shell command with this tree's paths; output and "exit:N".
local function shell(cmd)
  local p = io.popen(("LUA_PATH='%s' LUA_CPATH='%s' timeout 60 %s 2>&1; echo \"exit:$?\"")
                     :format(package.path, package.cpath, cmd))
  local out = p:read("a")
  p:close()
  return out
end

local function check(kv, out, code, want)
  for k, v in pairs(want) do
    assert(kv[k] == v, ("%s: expected %q, got %q\n--- output:\n%s"):format(
      k, v, tostring(kv[k]), out))
  end
  assert(code == 0, "exit code " .. tostring(code) .. "\n--- output:\n" .. out)
end

for _, method in ipairs(METHODS) do
  describe("under " .. method, function()
    it("runs a target with its args, knows itself and its parent", function()
      local kv, out, code = run(method, [[
        local function child(c, x, y)
          local me, parent = mp.current_process(), mp.parent_process()
          c:send({ x + y, me.name, me.pid, parent and parent.pid, mp.is_main(),
                   parent and parent:is_alive() })
        end
        if mp.is_main() then
          local a, b = mp.Pipe()
          local p = mp.Process{ target = child, args = { b, 40, 2 }, name = "kid" }
          p:start()
          local r = a:recv(10)
          print("sum=" .. r[1], "name=" .. r[2], "pidok=" .. tostring(r[3] == p.pid),
                "ppidok=" .. tostring(r[4] == mp.current_process().pid),
                "childmain=" .. tostring(r[5]), "parentalive=" .. tostring(r[6]),
                "join=" .. tostring(p:join(10)),
                "exitcode=" .. tostring(p.exitcode), "alive=" .. tostring(p:is_alive()),
                "method=" .. tostring(p._method or mp.get_start_method()))
        end
      ]])
      check(kv, out, code, { sum = "42", name = "kid", pidok = "true", ppidok = "true",
        childmain = tostring(method == "fork"), parentalive = "true", join = "0", exitcode = "0",
        alive = "false", method = method })
    end)

    it("reports exit codes: 0, 1 with the error's traceback, os.exit(n), signals", function()
      -- (interrupt: lua5.4 turns SIGINT into an error, so the exit code is 1)
      local kv, out, code = run(method, [[
        local function fails() error("boom in child") end
        local function leaves() os.exit(7) end
        local function spins() while true do end end
        if mp.is_main() then
          local function go(f) local p = mp.Process{ target = f } p:start() return p end
          print("nothing=" .. go(nil):join(10))
          print("error=" .. go(fails):join(10))
          print("exit=" .. go(leaves):join(10))
          local t = go(spins)
          print("timeout=" .. tostring(select(2, t:join(0.05))))
          t:terminate(); print("term=" .. t:join(10))
          local k = go(spins); k:kill(); print("kill=" .. k:join(10))
          local r, w = mp.Pipe(false)
          local i = mp.Process{ target = function(c) c:send("ready") spins() end, args = { w } }
          i:start(); r:recv(10); i:interrupt()
          print("interrupt=" .. i:join(10))
          local s = go(spins)
          local ready = mp.wait({ s }, 0.05)
          print("notready=" .. #ready)
          s:kill()
          print("ready=" .. #mp.wait({ s }, 10), "sentinel=" .. tostring(s:join(10)))
        end
      ]])
      check(kv, out, code, { nothing = "0", error = "1", exit = "7", timeout = "timeout",
        term = "-15", kill = "-9", interrupt = "1", notready = "0", ready = "1", sentinel = "-9" })
      assert.truthy(out:find("boom in child", 1, true))
      assert.truthy(out:find("stack traceback", 1, true))
    end)

    it("passes Pipe ends, Queue, Lock, Value, Array, Event and Semaphore", function()
      local kv, out, code = run(method, [[
        local function child(c, q, l, v, a, e, s)
          for _ = 1, 100 do l:acquire(); v.value = v.value + 1; l:release() end
          a[2] = a[1] * 10
          s:release()
          q:put({ "from", "queue" })
          c:send("via pipe")
          e:wait(10)
        end
        if mp.is_main() then
          local r, w = mp.Pipe(false)
          local q, l, v = mp.Queue(), mp.Lock(), mp.Value("int64", 0)
          local a, e, s = mp.Array("double", { 1.5, 0, 0 }), mp.Event(), mp.Semaphore(0)
          local ps = {}
          for i = 1, 2 do
            ps[i] = mp.Process{ target = child, args = { w, q, l, v, a, e, s } }
            ps[i]:start()
          end
          print("pipe=" .. r:recv(10) .. "," .. r:recv(10))
          local x = q:get(10); q:get(10)
          print("queue=" .. x[1] .. " " .. x[2])
          print("sem=" .. tostring(s:acquire(10) and s:acquire(10)))
          e:set()
          print("joins=" .. ps[1]:join(10) .. ps[2]:join(10))
          print("value=" .. v.value, "array=" .. a[2])
        end
      ]])
      check(kv, out, code, { pipe = "via pipe,via pipe", queue = "from queue",
        sem = "true", joins = "00", value = "200", array = "15.0" })
    end)

    it("sends closures with upvalues and functions of modules", function()
      local kv, out, code = run(method, [[
        local base = 100
        local function add(x) return base + x end
        if mp.is_main() then
          local r, w = mp.Pipe(false)
          local p = mp.Process{ target = function(c, f, g) c:send({ f(5), g("x", 3) }) end,
                                args = { w, add, string.rep } }
          p:start()
          local t = r:recv(10)
          print("closure=" .. t[1], "module=" .. t[2], "join=" .. p:join(10))
        end
      ]])
      check(kv, out, code, { closure = "105", module = "xxx", join = "0" })
    end)

    it("terminates daemonic children and joins the others at exit", function()
      local flag = H.tmpname("joined")
      local kv, out, code = run(method, ([[
        local function forever() while true do end end
        local function slow(path)
          os.execute("sleep 0.2")
          local f = io.open(path, "w") f:write("joined") f:close()
        end
        if mp.is_main() then
          local d = mp.Process{ target = forever, daemon = true }
          d:start()
          mp.Process{ target = slow, args = { %q } }:start()
          print("daemon=" .. d.pid)
        end
      ]]):format(flag))
      check(kv, out, code, {})
      local f = io.open(flag)
      assert.is_not_nil(f, "the non-daemonic child was not joined\n" .. out)
      f:close()
      os.remove(flag)
      assert.truthy(H.wait_until(function()
        local s = io.open("/proc/" .. kv.daemon .. "/stat")
        if not s then return true end
        local st = s:read("a"); s:close()
        return st:match("^%d+ %(.-%) Z") ~= nil
      end, 5), "daemon still running")
    end)

    it("never leaves a child behind a parent that was killed", function()
      local pidfile = H.tmpname("pid")
      local _, out = run(method, ([[
        local function forever() while true do end end
        if mp.is_main() then
          local p = mp.Process{ target = forever }
          p:start()
          local f = io.open(%q, "w") f:write(p.pid) f:close()
          require("multiprocessing.core").kill(require("multiprocessing.core").getpid(), 9)
        end
      ]]):format(pidfile))
      local f = assert(io.open(pidfile), out)
      local pid = f:read("a")
      f:close()
      os.remove(pidfile)
      assert.truthy(H.wait_until(function()
        local s = io.open("/proc/" .. pid .. "/stat")
        if not s then return true end
        local st = s:read("a"); s:close()
        return st:match("^%d+ %(.-%) Z") ~= nil
      end, 5), "child " .. pid .. " outlived its killed parent")
    end)

    it("runs a Pool whose workers follow the method", function()
      local kv, out, code = run(method, [[
        local k = 3
        if mp.is_main() then
          local ctx = mp.get_context(mp.get_start_method())
          local pool = ctx.Pool(2)
          print("method=" .. pool._method)
          local r = pool:map(function(x) return x * k end, { 1, 2, 3, 4 })
          print("map=" .. table.concat(r, ","))
          local pids = {}
          for _, pid in ipairs(pool:map(function() return require("multiprocessing.core").getpid() end,
                                        { 1, 2, 3, 4, 5, 6, 7, 8 }, 1)) do
            pids[pid] = true
          end
          local main = mp.current_process().pid
          print("notparent=" .. tostring(not pids[main]))
          print("workermain=" .. tostring(pool:apply(function() return mp.is_main() end)))
          pool:close(); pool:join()
          print("stats=" .. pool:stats().workers .. "," .. pool:stats().restarts)
        end
      ]])
      check(kv, out, code, { method = method, map = "3,6,9,12", notparent = "true",
        workermain = tostring(method == "fork"), stats = "0,0" })
    end)

    it("Pool: a task's error is a RemoteError with the worker's traceback", function()
      local kv, out, code = run(method, [[
        local function inner(x) error("bad item " .. x) end
        local function task(x) if x == 3 then inner(x) end return x end
        if mp.is_main() then
          local pool <close> = mp.Pool(2)
          local ok, err = pcall(pool.map, pool, task, { 1, 2, 3, 4 })
          print("ok=" .. tostring(ok), "remote=" .. tostring(mp.RemoteError:is(err)))
          print("message=" .. tostring(err.message):gsub("^.-:%d+: ", ""))
          print("inner=" .. tostring(err.traceback:find("in %a* ?function 'inner'") ~= nil
                                   or err.traceback:find("in upvalue 'inner'") ~= nil))
          print("worker=" .. tostring(err.pid ~= mp.current_process().pid))
          local r = pool:apply_async(task, { 3 })
          print("wait=" .. tostring(r:wait(10)), "successful=" .. tostring(r:successful()))
          print("after=" .. pool:apply(task, { 5 }))
        end
      ]])
      check(kv, out, code, { ok = "false", remote = "true", message = "bad item 3",
        inner = "true", worker = "true", wait = "true", successful = "false", after = "5" })
    end)

    it("Pool: a worker killed mid-task fails its task; the pool goes on", function()
      local kv, out, code = run(method, [[
        local core = require "multiprocessing.core"
        local function die() core.kill(core.getpid(), 9) core.poll({}, 10) end
        local function leave() os.exit(3) end
        local function spin() while true do end end
        if mp.is_main() then
          local pool <close> = mp.Pool(2)
          local r = pool:apply_async(die)
          local ok, err = pcall(r.get, r, 20)
          print("lost=" .. tostring(mp.WorkerLostError:is(err)), "code=" .. tostring(err.exitcode))
          local r2 = pool:apply_async(leave)
          local _, err2 = pcall(r2.get, r2, 20)
          print("lost2=" .. tostring(mp.WorkerLostError:is(err2)), "code2=" .. tostring(err2.exitcode))
          local xs = {}
          for i = 1, 100 do xs[i] = i end
          local sum = 0
          for _, v in ipairs(pool:map(function(x) return x * 2 end, xs, 1)) do sum = sum + v end
          print("sum=" .. sum)
          local t = pool:apply_async(spin, {}, { timeout = 0.3 })
          local _, err3 = pcall(t.get, t, 20)
          print("timeout=" .. tostring(mp.TimeoutError:is(err3)))
          print("after=" .. pool:apply(function(a, b) return a + b end, { 2, 3 }))
          print("restarts=" .. pool:stats().restarts, "workers=" .. pool:stats().workers)
        end
      ]], 60)
      check(kv, out, code, { lost = "true", code = "-9", lost2 = "true", code2 = "3",
        sum = "10100", timeout = "true", after = "5", restarts = "3", workers = "2" })
    end)

    it("Pool: initializer with handles in initargs, maxtasksperchild, terminate", function()
      local kv, out, code = run(method, [[
        local core = require "multiprocessing.core"
        local function init(q, tag) TAG = tag q:put(core.getpid()) end
        if mp.is_main() then
          local q = mp.Queue()
          local pool = mp.Pool{ processes = 2, initializer = init, initargs = { q, "tagged" },
                                maxtasksperchild = 2 }
          local a, b = q:get(20), q:get(20)
          print("inits=" .. tostring(a ~= nil and b ~= nil and a ~= b))
          local r = pool:map(function(x) return TAG .. x .. ":" .. core.getpid() end,
                             { 1, 2, 3, 4, 5, 6, 7, 8 }, 1)
          local pids, n = {}, 0
          for i, s in ipairs(r) do
            local tag, pid = s:match("^(%a+)" .. i .. ":(%d+)$")
            if tag == "tagged" and not pids[pid] then pids[pid] = true; n = n + 1 end
          end
          print("pids=" .. n)
          local xs = {}
          for i = 1, 10000 do xs[i] = i end
          local big = pool:map_async(function() core.poll({}, 0.01) end, xs, 1)
          local workers = {}
          for _, w in pairs(pool._workers) do workers[#workers + 1] = w.pid end
          pool:terminate()
          local ok, err = pcall(big.get, big, 5)
          print("terminated=" .. tostring(not ok and mp.ProcessError:is(err)))
          local alive = 0
          for _, pid in ipairs(workers) do if core.kill(pid, 0) == true then alive = alive + 1 end end
          print("alive=" .. alive, "children=" .. #mp.active_children())
        end
      ]], 60)
      check(kv, out, code, { inits = "true", pids = "4", terminated = "true", alive = "0",
        children = "0" })
    end)
  end)
end

describe("the entry chunk under spawn", function()
  -- regression: a closure whose upvalue was a registered class arrived
  -- with a copy of the class, whose objects mp.dumps then refused
  it("gives a spawned child its own registered class for an upvalue", function()
    H.run_ok([[
      local mp = require "multiprocessing"
      local Point = mp.register("spec.SpawnPoint", { __name = "spec.SpawnPoint" })
      local function make() return setmetatable({ x = 1 }, Point) end
      local function child()
        local o = make()
        local ok = getmetatable(o) == Point and pcall(mp.dumps, o)
        os.exit(ok and 0 or 3)
      end
      if mp.is_main() then
        for _, m in ipairs { "spawn", "forkserver" } do
          local p = mp.get_context(m).Process{ target = child }
          p:start()
          assert(p:join(30) == 0, m)
        end
        require("multiprocessing.spawn")._forkserver_stop()
        print("ok")
      end
    ]], 60)
  end)

  it("is re-run without the guarded block: the module-isolation seed", function()
    local out = shell("lua5.4 examples/module_isolation.lua")
    for _, want in ipairs({
      "fork:        module value = set by the main block, global = set by the main block",
      "spawn:       module value = the module's initial value, global = top level",
      "forkserver:  module value = the module's initial value, global = top level" }) do
      assert.truthy(out:find(want, 1, true), out)
    end
    assert.truthy(out:find("exit:0", 1, true), out)
  end)

  for _, method in ipairs({ "spawn", "forkserver" }) do
    it("refuses an unguarded start while bootstrapping, and never chains (" .. method .. ")", function()
      local count = H.tmpname("count")
      local kv, out = run(method, ([[
        local f = io.open(%q, "a") f:write("x") f:close()
        local p = mp.Process{ target = function() end }
        p:start()
        print("code=" .. tostring(p:join(10)))
      ]]):format(count))
      local f = io.open(count)
      local runs = f and f:read("a") or ""
      if f then f:close() end
      os.remove(count)
      assert.are.equal("xx", runs, "the entry chunk ran " .. #runs .. " times\n" .. out)
      assert.are.equal("1", kv.code, out)
      assert.truthy(out:find("ProcessError", 1, true), out)
      assert.truthy(out:find("if mp.is_main() then", 1, true), out)
    end)
  end

  for _, method in ipairs({ "spawn", "forkserver" }) do
    it("breaks a Pool made outside the guard instead of restarting its workers forever (" .. method .. ")", function()
      local count = H.tmpname("count")
      local kv, out = run(method, ([[
        local f = io.open(%q, "a") f:write("x") f:close()
        local pool = mp.Pool(2)
        local ok, err = pcall(pool.map, pool, function(x) return x end, { 1, 2, 3 })
        -- (a newline first: the workers' stderr may end without one)
        print("\nok=" .. tostring(ok), "type=" .. tostring(err.type))
        print("message=" .. tostring(err.message):gsub("\n", " "))
        print("later=" .. tostring(pcall(pool.apply, pool, print)))
        pool:terminate()
      ]]):format(count))
      local f = io.open(count)
      local runs = f and f:read("a") or ""
      if f then f:close() end
      os.remove(count)
      assert.are.equal("ProcessError", kv.type, out)
      assert.are.equal("false", kv.ok, out)
      assert.are.equal("false", kv.later, out)
      assert.truthy(kv.message:find("before it was ready", 1, true), out)
      assert.truthy(out:find("if mp.is_main() then", 1, true), out)   -- the worker's stderr
      -- the main run, and at most one re-run per worker slot
      assert.truthy(#runs >= 2 and #runs <= 3, "the entry chunk ran " .. #runs .. " times\n" .. out)
    end)
  end

  for _, method in ipairs({ "spawn", "forkserver" }) do
    it("lets a child's target start children of its own (" .. method .. ")", function()
      local kv, out, code = run(method, [[
        local function grandchild(c) c:send("grandchild of " .. mp.parent_process().pid) end
        local function child(c)
          local g = mp.Process{ target = grandchild, args = { c } }
          g:start()
          c:send(mp.current_process().pid)
          os.exit(g:join(10) + 5)
        end
        if mp.is_main() then
          local r, w = mp.Pipe()
          local p = mp.Process{ target = child, args = { w } }
          p:start()
          local a, b = r:recv(10), r:recv(10)
          local pid, msg = a, b
          if type(a) == "string" then pid, msg = b, a end
          print("msg=" .. (msg == "grandchild of " .. pid and "ok" or tostring(msg)),
                "code=" .. p:join(10))
        end
      ]])
      check(kv, out, code, { msg = "ok", code = "5" })
    end)
  end

  it("gives a spawned child its parent's default start method", function()
    local out, code = H.run_lua(([[
      package.path = %q package.cpath = %q
      local mp = require "multiprocessing"
      local function child(c) c:send(mp.get_start_method()) end
      if mp.is_main() then
        mp.set_start_method("forkserver")
        local r, w = mp.Pipe()
        local p = mp.Process{ target = child, args = { w }, start_method = "spawn" }
        p:start()
        print("method=" .. r:recv(10), "code=" .. p:join(10))
      end
    ]]):format(package.path, package.cpath))
    assert.are.equal(0, code, out)
    assert.truthy(out:find("method=forkserver\tcode=0", 1, true), out)
  end)

  it("gives the child the functions the entry chunk's top level defines", function()
    local kv, out, code = run("spawn", [[
      function GLOBAL_WORKER(c) c:send("global worker ran") end
      local function reg_worker(c) c:send("registered ran") end
      mp.register("reg_worker", reg_worker)
      if mp.is_main() then
        local r, w = mp.Pipe(false)
        local p = mp.Process{ target = GLOBAL_WORKER, args = { w } }
        p:start(); print("global=" .. r:recv(10)); p:join(10)
        local q = mp.Process{ target = reg_worker, args = { w } }
        q:start(); print("registered=" .. r:recv(10)); q:join(10)
      end
    ]])
    check(kv, out, code, { global = "global worker ran", registered = "registered ran" })
  end)
end)

describe("a program without an entry chunk", function()
  H.leakcheck()

  it("runs spawned bytecode targets from inside busted without re-running busted", function()
    local r, w = mp.Pipe(false)
    local x = 7
    local p = mp.Process{ target = function(c) c:send({ x * 6, mp.is_main() }) end,
                          args = { w }, start_method = "spawn" }
    p:start()
    w:close()
    local t = r:recv(10)
    assert.are.equal(42, t[1])
    assert.is_false(t[2])
    assert.are.equal(0, p:join(10))
    r:close()
    p:close()
  end)

  it("starts forkserver children from inside busted and leaks no fd", function()
    local spawn = require "multiprocessing.spawn"
    local r, w = mp.Pipe(false)
    for i = 1, 3 do
      local p = mp.Process{ target = function(c, n) c:send(n * 2) end, args = { w, i },
                            start_method = "forkserver" }
      p:start()
      assert.are.equal(i * 2, r:recv(10))
      assert.are.equal(0, p:join(10))
      assert.is_false(p:is_alive())
      p:close()
    end
    local k = mp.Process{ target = function() while true do end end, start_method = "forkserver" }
    k:start()
    k:kill()
    assert.are.equal(-9, k:join(10))
    k:close()
    r:close(); w:close()
    spawn._forkserver_stop()
  end)

  it("keeps a forkserver child forked ahead, and replaces one killed unused", function()
    local spawn = require "multiprocessing.spawn"
    local core = require "multiprocessing.core"
    local r, w = mp.Pipe(false)
    local function start_one()            -- -> the pid of the child's parent
      local p = mp.Process{ target = function(c) c:send(require("multiprocessing.core").getppid()) end,
                            args = { w }, start_method = "forkserver" }
      p:start()
      local ppid = r:recv(10)
      assert.are.equal(0, p:join(10))
      p:close()
      return ppid
    end
    local server = start_one()
    local warm = H.wait_until(function()
      local k = H.children(server)
      return #k == 1 and k[1]
    end, 5)
    assert.truthy(warm, "the server has no child forked ahead")
    assert.is_true(core.kill(warm, 9))
    -- once the server has reaped it (a start racing the kill could be
    -- handed the dying child, as if the kill had come just after its fork)
    local function gone(pid)
      local f = io.open("/proc/" .. pid .. "/stat")
      if f then f:close() end
      return f == nil
    end
    assert.truthy(H.wait_until(function() return gone(warm) end, 5),
                  "the killed child was not reaped")
    assert.are.equal(server, start_one())    -- served all the same
    local again = H.wait_until(function()
      local k = H.children(server)
      return #k == 1 and k[1] ~= warm and k[1]
    end, 5)
    assert.truthy(again, "the killed child was not replaced")
    r:close(); w:close()
    spawn._forkserver_stop()
    assert.is_true(gone(again), "the child forked ahead outlived the server")
  end)

  it("hands an fd over a socket with one byte (_send_fd, _recv_fd)", function()
    local core = require "multiprocessing.core"
    local a, b = core._socketpair()          -- the carrier
    local p, q = core._socketpair()          -- what it carries
    assert.is_true(core._send_fd(a, q))
    q:close()
    local q2 = assert(core._recv_fd(b))
    local cp = core.conn_from_fd(p:_detach(), true, true)
    local cq = core.conn_from_fd(q2:_detach(), true, true)
    assert.is_true(cp:send("through the copy"))
    assert.are.equal("through the copy", cq:recv(5))
    cp:close(); cq:close()
    a:close()
    assert.is_nil(core._recv_fd(b))          -- end of stream
    b:close()
  end)

  it("writes an exit code to a status pipe without a reader: false, no SIGPIPE", function()
    local core = require "multiprocessing.core"
    local r, w = core._pipe()
    r:close()
    assert.is_false(core._status_write(w, 3))    -- still here: not killed
    w:close()
    r, w = core._pipe()
    assert.is_true(core._status_write(w, 3))
    r:close(); w:close()
  end)

  it("says what is missing when a target needs the entry chunk", function()
    local out, code = H.run_lua(([[
      package.path = %q package.cpath = %q
      local mp = require "multiprocessing"
      mp.set_main_chunk(false)
      function WORKER() end
      local p = mp.Process{ target = WORKER, start_method = "spawn" }
      p:start()
      print("code=" .. p:join(10))
    ]]):format(package.path, package.cpath))
    assert.are.equal(0, code, out)
    assert.truthy(out:find("code=1", 1, true), out)
    assert.truthy(out:find("WORKER", 1, true), out)
    assert.truthy(out:find("mp.set_main_chunk", 1, true), out)
  end)
end)

describe("start methods and contexts", function()
  H.leakcheck()

  after_each(function() mp.set_start_method(nil, true) end)

  it("lists the methods and sets one once", function()
    assert.are.same({ "fork", "spawn", "forkserver" }, mp.get_all_start_methods())
    assert.are.equal("fork", mp.get_start_method())
    mp.set_start_method("spawn")
    assert.are.equal("spawn", mp.get_start_method())
    local ok, err = pcall(mp.set_start_method, "fork")
    assert.is_false(ok)
    assert.is_true(mp.ProcessError:is(err))
    assert.truthy(tostring(err):find("force", 1, true))
    mp.set_start_method("forkserver", true)
    assert.are.equal("forkserver", mp.get_start_method())
  end)

  it("rejects bad arguments naming them", function()
    assert.has_error(function() mp.set_start_method("vfork") end)
    assert.has_error(function() mp.get_context("thread") end)
    assert.has_error(function() mp.set_executable(42) end)
    assert.has_error(function() mp.set_executable("") end)
    assert.has_error(function() mp.set_forkserver_preload("x") end)
    assert.has_error(function() mp.set_forkserver_preload({ 1 }) end)
    assert.has_error(function() mp.set_main_chunk(3) end)
    assert.has_error(function() mp.Process{ start_method = "clone" } end)
    local _, err = pcall(mp.set_start_method, "vfork")
    assert.truthy(tostring(err):find("set_start_method", 1, true))
  end)

  it("binds every constructor of a context to its method", function()
    local ctx = mp.get_context("spawn")
    assert.are.equal(ctx, mp.get_context("spawn"))
    assert.are.equal("spawn", ctx.get_start_method())
    for _, name in ipairs({ "Process", "Pipe", "Queue", "SimpleQueue", "JoinableQueue",
                            "Lock", "RLock", "Semaphore", "BoundedSemaphore", "Condition",
                            "Event", "Barrier", "Value", "Array", "RawValue", "RawArray",
                            "Pool" }) do
      assert.is_function(ctx[name], name)
    end
    assert.are.equal("spawn", ctx.Process{}._method)
    assert.are.equal("fork", mp.get_context("fork").Process{ start_method = "fork" }._method)
    assert.is_nil(mp.Process{}._method)
    local pool = ctx.Pool and mp.get_context("fork").Pool(1)
    assert.are.equal("fork", pool._method)
    pool:terminate()
  end)

  it("raises a ProcessError when the executable cannot be started", function()
    local old = require("multiprocessing.spawn").get_executable()
    mp.set_executable("/nonexistent/lua5.4")
    local p = mp.Process{ target = function() end, start_method = "spawn" }
    local ok, err = pcall(p.start, p)
    mp.set_executable(old)
    assert.is_false(ok)
    assert.is_true(mp.ProcessError:is(err))
    assert.truthy(tostring(err):find("/nonexistent/lua5.4", 1, true))
  end)

  it("refuses an argument that cannot be serialized before starting anything", function()
    local p = mp.Process{ target = function() end, args = { io.stdout },
                          start_method = "spawn" }
    local ok, err = pcall(p.start, p)
    assert.is_false(ok)
    assert.truthy(tostring(err):find("process.args[1]", 1, true), tostring(err))
    assert.is_nil(p.pid)
  end)
end)

describe("the fork server", function()
  it("is started once, reused, and exits with its creator", function()
    local kv, out, code = run("forkserver", [[
      local core = require "multiprocessing.core"
      local function parent_pid(c) c:send(core.getppid()) end
      if mp.is_main() then
        local r, w = mp.Pipe()
        local ps = {}
        for i = 1, 3 do
          ps[i] = mp.Process{ target = parent_pid, args = { w } }
          ps[i]:start()
        end
        local a, b, c = r:recv(10), r:recv(10), r:recv(10)
        for i = 1, 3 do ps[i]:join(10) end
        print("same=" .. tostring(a == b and b == c), "notme=" .. tostring(a ~= core.getpid()))
        print("server=" .. a)
      end
    ]])
    check(kv, out, code, { same = "true", notme = "true" })
    assert.truthy(H.wait_until(function()
      local s = io.open("/proc/" .. kv.server .. "/stat")
      if not s then return true end
      local st = s:read("a"); s:close()
      return st:match("^%d+ %(.-%) Z") ~= nil
    end, 5), "the fork server outlived its creator")
  end)

  -- (Lua source) kids(): the children of this process, { pid = state }
  local KIDS = [[
    local core = require "multiprocessing.core"
    local function kids()
      local t, me = {}, tostring(core.getpid())
      local ls = io.popen("ls /proc")
      for d in ls:lines() do
        local f = d:match("^%d+$") and io.open("/proc/" .. d .. "/stat")
        if f then
          local comm, st, pp = (f:read("l") or ""):match("^%d+ %((.*)%) (%S) (%d+)")
          f:close()
          if pp == me and comm ~= "ls" and comm ~= "sh" then t[tonumber(d)] = st end
        end
      end
      ls:close()
      return t
    end
    -- SIGKILL the fork server; its children (the workers) are sent
    -- SIGKILL as it exits, so they are gone once it is a zombie
    local function kill_server()
      local pid
      for k, st in pairs(kids()) do if st ~= "Z" then pid = k end end
      core.kill(pid, 9)
      local deadline = core.monotonic() + 10
      while kids()[pid] ~= "Z" and core.monotonic() < deadline do os.execute("sleep 0.01") end
    end
    local function zombies()
      local n = 0
      for _, st in pairs(kids()) do if st == "Z" then n = n + 1 end end
      return n
    end
  ]]

  it("is reaped and replaced when killed: a Pool's workers come back, no zombie stays", function()
    local kv, out, code = run("forkserver", KIDS .. [[
      local function sq(x) return x * x end
      if mp.is_main() then
        local pool = mp.Pool{ processes = 2, initializer = function() end }
        local ok = #pool:map(sq, { 1, 2, 3 }) == 3
        collectgarbage("stop")               -- reaped at once, not by a collection
        for _ = 1, 3 do
          kill_server()
          local r = pool:map(sq, { 1, 2, 3, 4, 5, 6 }, 1)
          ok = ok and r[6] == 36
        end
        print("ok=" .. tostring(ok), "workers=" .. pool:stats().workers)
        pool:terminate()
        print("zombies=" .. zombies())
      end
    ]], 60)
    check(kv, out, code, { ok = "true", workers = "2", zombies = "0" })
  end)

  it("fails a Pool's tasks with a ProcessError when it cannot be restarted, never hangs", function()
    local kv, out, code = run("forkserver", KIDS .. [[
      local function sq(x) return x * x end
      if mp.is_main() then
        local pool = mp.Pool{ processes = 2, initializer = function() end }
        pool:map(sq, { 1, 2 })
        mp.set_executable("/nonexistent/lua5.4")
        kill_server()
        local r = pool:map_async(sq, { 1, 2, 3, 4 }, 1)
        local ok, err = pcall(r.get, r, 20)
        print("first=" .. (ok and "returned" or tostring(err.type)))
        print("why=" .. tostring(not ok and err.message:find("fork server could not be started", 1, true) ~= nil))
        ok, err = pcall(function()
          local r2 = pool:map_async(sq, { 1, 2 }, 1)
          return r2:get(5)
        end)
        print("second=" .. (ok and "returned" or tostring(err.type)))
        pool:terminate()
        print("zombies=" .. zombies())
      end
    ]], 60)
    check(kv, out, code, { first = "ProcessError", why = "true", second = "ProcessError",
                           zombies = "0" })
  end)

  it("ends a child whose server died before the join that reports it returns", function()
    -- (regression: a Pool ran tasks twice when the server was killed: the
    -- status pipe closes before the kernel kills the server's children, and
    -- the worker's queued tasks went to another worker while it still ran)
    local kv, out, code = run("forkserver", KIDS .. [[
      local function forever(c)
        core._test.no_pdeathsig()          -- as if its SIGKILL had not come yet
        c:send("ready")
        while true do core.poll({}, 1) end
      end
      if mp.is_main() then
        local a, b = mp.Pipe()
        local p = mp.Process{ target = forever, args = { b } }
        p:start()
        a:recv(10)
        local pid = p.pid
        kill_server()
        local c = p:join(10)
        local f = io.open("/proc/" .. pid .. "/stat")
        local st = f and f:read("l"):match("^%d+ %(.-%) (%S)")
        if f then f:close() end
        print("code=" .. tostring(c), "gone=" .. tostring(st == nil or st == "Z"))
        if st and st ~= "Z" then core.kill(pid, 9) end
      end
    ]], 60)
    check(kv, out, code, { code = "-9", gone = "true" })
  end)

  it("starts a Pool's workers again once it can be restarted", function()
    local kv, out, code = run("forkserver", KIDS .. [[
      local function sq(x) return x * x end
      if mp.is_main() then
        local pool = mp.Pool{ processes = 2, initializer = function() end }
        pool:map(sq, { 1, 2 })
        local exe = mp.get_executable()
        mp.set_executable("/nonexistent/lua5.4")
        kill_server()
        local r = pool:map_async(sq, { 1, 2, 3, 4 }, 1)
        r:wait(0.2)                          -- the first restarts fail
        mp.set_executable(exe)
        local res = r:get(20)
        -- the second worker may come back after the tasks are done: the
        -- pool restarts it as it steps (bounded)
        local t0 = require("multiprocessing.core").monotonic()
        while pool:stats().workers < 2 and require("multiprocessing.core").monotonic() - t0 < 20 do
          pool:poll(0.05)
        end
        print("got=" .. tostring(res and res[4]), "workers=" .. pool:stats().workers)
        pool:terminate()
      end
    ]], 60)
    check(kv, out, code, { got = "16", workers = "2" })
  end)

  it("preloads the modules named by set_forkserver_preload", function()
    local kv, out, code = run("forkserver", [[
      package.path = "examples/?.lua;" .. package.path
      mp.set_forkserver_preload({ "mp_module" })
      local function probe(c) c:send(package.loaded.mp_module ~= nil) end
      if mp.is_main() then
        local r, w = mp.Pipe()
        local p = mp.Process{ target = probe, args = { w } }
        p:start()
        print("preloaded=" .. tostring(r:recv(10)), "join=" .. p:join(10))
      end
    ]])
    check(kv, out, code, { preloaded = "true", join = "0" })
  end)

  it("re-runs the entry chunk as the file is now, even after it changed", function()
    local kv, out, code = run("forkserver", [[
      VERSION = "first"
      local function report(c) c:send(VERSION) end
      if mp.is_main() then
        local r, w = mp.Pipe()
        local function child()
          local p = mp.Process{ target = report, args = { w } }
          p:start(); local v = r:recv(10); p:join(10)
          return v
        end
        local path = debug.getinfo(1, "S").source:sub(2)
        local function edit(from, to)
          local f = io.open(path) local src = f:read("a") f:close()
          f = io.open(path, "w") f:write((src:gsub(from, to, 1))) f:close()
        end
        local a = child()
        edit('"first"', '"second"')
        local b, c = child(), child()
        os.execute("sleep 0.05")           -- past the file system's clock tick
        edit('"second"', '"fourth"')         -- the same size
        print("before=" .. a, "after=" .. b, "again=" .. c, "same_size=" .. child())
      end
    ]])
    check(kv, out, code, { before = "first", after = "second", again = "second",
                           same_size = "fourth" })
  end)

  it("gives a child the collector settings of a fresh interpreter", function()
    local kv, out, code = run("forkserver", [[
      local function pause(c) c:send(collectgarbage("setpause", 200)) end
      if mp.is_main() then
        local r, w = mp.Pipe()
        local fresh = collectgarbage("setpause", 200)
        local p = mp.Process{ target = pause, args = { w } }
        p:start()
        print("same=" .. tostring(r:recv(10) == fresh), "join=" .. p:join(10))
      end
    ]])
    check(kv, out, code, { same = "true", join = "0" })
  end)

  it("is per creator: a forked child that uses it gets its own", function()
    local kv, out, code = run("forkserver", [[
      local core = require "multiprocessing.core"
      local function ppid(c) c:send(core.getppid()) end
      local function middle(c)
        local p = mp.Process{ target = ppid, args = { c } }
        p:start(); p:join(10)
      end
      if mp.is_main() then
        local r, w = mp.Pipe()
        local a = mp.Process{ target = ppid, args = { w } }
        a:start(); local s1 = r:recv(10); a:join(10)
        local m = mp.Process{ target = middle, args = { w }, start_method = "fork" }
        m:start(); local s2 = r:recv(10)
        print("mid=" .. m:join(10), "distinct=" .. tostring(s1 ~= s2))
      end
    ]])
    check(kv, out, code, { mid = "0", distinct = "true" })
  end)
end)

describe("embedding", function()
  it("runs examples/embed/host, whose spawned Pool workers call its C function", function()
    local f = io.open("examples/embed/host")
    if not f then
      pending("examples/embed/host is not built (make embed)")
      return
    end
    f:close()
    local out = shell("examples/embed/host")
    for i = 1, 3 do
      assert.truthy(out:find(("worker %%d+: host.add%%(%d, %d%%) = %d"):format(i, 10 * i, 11 * i)), out)
    end
    assert.truthy(out:find("sum from 3 tasks in spawned Pool workers: 66", 1, true), out)
    assert.truthy(out:find("exit:0", 1, true), out)
  end)

  it("mp_child_main is exported for hosts", function()
    local nm = io.popen("nm -D --defined-only lua/multiprocessing/core.so 2>/dev/null")
    local syms = nm:read("a")
    nm:close()
    if syms == "" then pending("nm is not available") return end
    assert.truthy(syms:find("mp_child_main", 1, true))
    assert.truthy(syms:find("luaopen_multiprocessing_core", 1, true))
  end)
end)


-- Ctrl-C (see H.interrupt_wait): a forkserver start that it interrupts
-- still reads the server's answer, so the next start is in step with the
-- server.
describe("SIGINT interrupts a blocked wait", function()
  H.leakcheck()

  it("in a forkserver start waiting for the server, which stays in step", function()
    local core = require "multiprocessing.core"
    local SIGSTOP, SIGCONT = 19, 18       -- Linux (x86, arm)
    local info_r, info_w = mp.Pipe(false)
    local ready <close> = mp.Event()
    local go <close> = mp.Event()
    local c = H.start(function()
      local spawn = require "multiprocessing.spawn"
      local r, w = mp.Pipe(false)
      local function one(n)
        return mp.Process{ target = function(conn, k) conn:send(k) end, args = { w, n },
                           start_method = "forkserver" }
      end
      local p1 = one(1)
      p1:start()
      if r:recv(10) ~= 1 or p1:join(10) ~= 0 then return 6 end
      info_w:send(H.children(core.getpid()))   -- the server, alone
      ready:set()
      go:wait(10)                              -- the server is stopped now
      local p2 = one(2)
      local ok, err = pcall(p2.start, p2)
      if ok or err ~= "interrupted!" then return 7 end
      -- the answer was read all the same: p2 runs and is ours to join
      if p2._state ~= "started" or r:recv(10) ~= 2 or p2:join(10) ~= 0 then return 8 end
      local p3 = one(3)
      p3:start()
      if r:recv(10) ~= 3 or p3:join(10) ~= 0 then return 9 end
      spawn._forkserver_stop()
      return 0
    end)
    assert.is_true(ready:wait(30))
    local kids = info_r:recv(10)
    assert.are.equal(1, #kids)
    core.kill(kids[1], SIGSTOP)
    go:set()
    H.sleep(0.3)
    c:interrupt()
    H.sleep(0.2)
    core.kill(kids[1], SIGCONT)
    assert.are.equal(0, H.finish(c, 30))
    info_r:close(); info_w:close()
  end)
end)
