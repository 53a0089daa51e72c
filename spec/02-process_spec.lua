-- Process under fork: arguments, lifecycle, exit codes, signals, registry.
local H = require "helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local function started(opts)
  local p = mp.Process(opts)
  p:start()
  return p
end

-- Read a file written by a child (a way to see what happened in it).
local function slurp(path)
  local f = io.open(path)
  if not f then return nil end
  local s = f:read("a")
  f:close()
  os.remove(path)
  return s
end

describe("Process arguments", function()
  it("rejects a non-table, unknown options and bad field types", function()
    assert.has_error(function() mp.Process(5) end)
    assert.has_error(function() mp.Process{ targt = print } end)
    assert.has_error(function() mp.Process{ target = 5 } end)
    assert.has_error(function() mp.Process{ args = "x" } end)
    assert.has_error(function() mp.Process{ name = 1 } end)
    assert.has_error(function() mp.Process{ daemon = "yes" } end)
    assert.has_error(function() mp.Process{ run = 1 } end)
  end)

  it("names processes Process-N by default and keeps a given name", function()
    local a, b = mp.Process(), mp.Process{ name = "worker-1" }
    assert.truthy(a.name:match("^Process%-%d+$"))
    assert.are.equal("worker-1", b.name)
    assert.are.equal("<Process(worker-1, initial)>", tostring(b))
  end)

  it("has no pid, exitcode or sentinel before start", function()
    local p = mp.Process()
    assert.is_nil(p.pid)
    assert.is_nil(p.exitcode)
    assert.is_nil(p.sentinel)
    assert.is_false(p:is_alive())
  end)

  it("refuses to terminate, kill or interrupt a process that was not started", function()
    local p = mp.Process()
    assert.has_error(function() p:terminate() end, "cannot terminate a process that was not started")
    assert.has_error(function() p:kill() end, "cannot kill a process that was not started")
    assert.has_error(function() p:interrupt() end, "cannot interrupt a process that was not started")
  end)

  it("refuses to join a process that was not started", function()
    assert.has_error(function() mp.Process():join(0) end,
                     "can only join a started process")
  end)

  it("refuses a negative timeout", function()
    local p = started{}
    assert.has_error(function() p:join(-1) end)
    p:join(5)
  end)

  it("keeps read-only fields read-only", function()
    local p = mp.Process()
    assert.has_error(function() p.pid = 3 end)
    assert.has_error(function() p.exitcode = 0 end)
  end)
end)

describe("Process", function()
  H.leakcheck()

  it("runs its target with its args in a child", function()
    local out = H.tmpname("args")
    local p = started{ target = function(path, a, b)
      local f = io.open(path, "w")
      f:write(a + b, " ", core.getpid())
      f:close()
    end, args = { out, 2, 3 } }
    assert.are.equal(0, p:join(5))
    local sum, pid = slurp(out):match("(%d+) (%d+)")
    assert.are.equal("5", sum)
    assert.are.equal(p.pid, tonumber(pid))
    assert.are_not.equal(core.getpid(), p.pid)
  end)

  it("passes nils in args given as table.pack(...)", function()
    local out = H.tmpname("nils")
    local p = started{ target = function(path, x, y, z)
      local f = io.open(path, "w")
      f:write(tostring(x), tostring(y), tostring(z))
      f:close()
    end, args = table.pack(out, nil, 2, nil) }
    p:join(5)
    assert.are.equal("nil2nil", slurp(out))
  end)

  it("raises 'cannot start a process twice' and the first start still runs", function()
    local a, b = mp.Pipe()
    local p = started{ target = function(c) c:send("ran") end, args = { b } }
    local ok, err = pcall(p.start, p)
    assert.is_false(ok)
    assert.is_true(mp.ProcessError:is(err))
    assert.are.equal("cannot start a process twice", err.message)
    assert.are.equal("ran", a:recv(5))
    assert.are.equal(0, p:join(5))
    a:close(); b:close()
  end)

  it("reports exit codes: 0, 1 on error, n for os.exit(n), -N for a signal", function()
    assert.are.equal(0, started{ target = function() end }:join(5))
    assert.are.equal(0, started{}:join(5))
    assert.are.equal(3, started{ target = function() os.exit(3) end }:join(5))
    assert.are.equal(1, select("#", started{}:join(5)))
    local q = started{ target = function() while true do end end }
    assert.are.same({ nil, "timeout" }, { q:join(0.05) })
    q:kill()
    assert.are.equal(-9, q:join(5))
    assert.are.equal(-9, q.exitcode)
  end)

  it("exits 1 on an error and writes it with its traceback to stderr", function()
    local out, code = H.run_lua([[
      local mp = require "multiprocessing"
      local function inner() error("deep failure") end
      local p = mp.Process{ name = "failing", target = function() inner() end }
      p:start()
      io.write("exitcode=", p:join(10), "\n")
    ]])
    assert.are.equal(0, code, out)
    assert.truthy(out:find("exitcode=1", 1, true), out)
    assert.truthy(out:find("deep failure", 1, true), out)
    assert.truthy(out:find("stack traceback", 1, true), out)
    assert.truthy(out:find("in upvalue 'inner'", 1, true), out)
    assert.truthy(out:find("failing", 1, true), out)
    -- the parent's frames below the fork are cut
    assert.is_nil(out:find("in main chunk", 1, true), out)
  end)

  it("terminate, kill and interrupt send SIGTERM, SIGKILL and SIGINT", function()
    local loop = function() while true do end end
    for sig, how in pairs{ [15] = "terminate", [9] = "kill", [2] = "interrupt" } do
      local p = started{ target = loop }
      assert.is_true(p:is_alive())
      p[how](p)
      local code = p:join(5)
      if how == "interrupt" and code == 1 then
        -- the lua5.4 interpreter turns SIGINT into an "interrupted!" error
        -- while its main chunk runs, as Python raises KeyboardInterrupt
        code = -2
      end
      assert.are.equal(-sig, code)
      assert.is_false(p:is_alive())
      p[how](p)                 -- after the end: nothing happens
    end
  end)

  it("has a sentinel that becomes readable when it ends", function()
    local a, b = mp.Pipe()
    local p = started{ target = function(c) c:recv(5) end, args = { b } }
    assert.are.equal("number", type(p.sentinel))
    assert.are.same({}, mp.wait({ p.sentinel }, 0.05))
    a:send(1)
    assert.are.same({ p }, mp.wait({ p }, 5))
    p:join(5)
    a:close(); b:close()
  end)

  it("calls run in the caller, any number of times, and run may be overridden", function()
    local n = 0
    local p = mp.Process{ target = function(k) n = n + k end, args = { 2 } }
    p:run(); p:run()
    assert.are.equal(4, n)
    local seen
    local q = mp.Process{ name = "custom", run = function(self) seen = self.name end }
    q:run()
    assert.are.equal("custom", seen)
    local out = H.tmpname("run")
    local r = mp.Process{ run = function(self)
      local f = io.open(self.out, "w"); f:write(self.name); f:close()
    end }
    r.out = out
    r:start()
    assert.are.equal(0, r:join(5))
    assert.are.equal(r.name, slurp(out))
  end)

  it("knows its current and parent process in the child", function()
    local a, b = mp.Pipe()
    local p = started{ name = "kid", target = function(c)
      local cur, par = mp.current_process(), mp.parent_process()
      c:send(cur.name .. " " .. cur.pid .. " " .. par.pid .. " " .. tostring(par:is_alive()))
    end, args = { b } }
    assert.are.equal("kid " .. p.pid .. " " .. core.getpid() .. " true", a:recv(5))
    p:join(5)
    assert.are.equal("MainProcess", mp.current_process().name)
    assert.is_nil(mp.parent_process())
    a:close(); b:close()
  end)

  it("lists live children in active_children and reaps finished ones", function()
    local a, b = mp.Pipe()
    local p = started{ target = function(c) c:recv(5) end, args = { b } }
    local found = false
    for _, c in ipairs(mp.active_children()) do found = found or c == p end
    assert.is_true(found)
    a:send("go")
    p:join(5)
    for _, c in ipairs(mp.active_children()) do assert.are_not.equal(p, c) end
    a:close(); b:close()
  end)

  it("does not let a daemonic process have children", function()
    local a, b = mp.Pipe()
    local p = started{ daemon = true, target = function(c)
      local ok, err = pcall(function() mp.Process{}:start() end)
      c:send(tostring(ok) .. " " .. tostring(err and err.message))
    end, args = { b } }
    assert.are.equal("false daemonic processes are not allowed to have children", a:recv(5))
    p:join(5)
    a:close(); b:close()
  end)

  it("closes: raises while running, then releases the sentinel", function()
    local a, b = mp.Pipe()
    local p = started{ target = function(c) c:recv(5) end, args = { b } }
    assert.has_error(function() p:close() end)
    a:send(1)
    p:join(5)
    p:close()
    p:close()
    assert.are.equal("<Process(" .. p.name .. ", closed)>", tostring(p))
    assert.has_error(function() p:join() end, "process object is closed")
    a:close(); b:close()
  end)

  it("works as a to-be-closed variable and is collected without leaks", function()
    do
      local p <close> = started{}
      p:join(5)
    end
    for _ = 1, 20 do started{}:join(5) end
    collectgarbage(); collectgarbage()
  end)

  it("refuses to set daemon after start", function()
    local p = started{}
    assert.has_error(function() p.daemon = true end, "process has already started")
    p:join(5)
  end)

  it("flushes buffered output before fork, so nothing is written twice", function()
    local path = H.tmpname("flush")
    local f = io.open(path, "w")
    f:setvbuf("full")
    f:write("once;")
    local p = started{ target = function() f:write("child;") f:flush() end }
    p:join(5)
    f:close()
    assert.are.equal("once;child;", slurp(path))
  end)

  it("never outlives a parent that was killed", function()
    -- an intermediate process starts a grandchild and is then killed
    local a, b = mp.Pipe()
    local mid = started{ target = function(c)
      local g = mp.Process{ target = function() while true do end end }
      g:start()
      c:send(g.pid)
      while true do end
    end, args = { b } }
    local gpid = a:recv(5)
    mid:kill()
    assert.are.equal(-9, mid:join(5))
    local gone = H.wait_until(function()
      local f = io.open("/proc/" .. gpid .. "/stat")
      if not f then return true end
      local s = f:read("a"); f:close()
      return s:match("^%d+ %(.-%) Z") ~= nil
    end, 5)
    assert.is_true(gone)
    a:close(); b:close()
  end)
end)

describe("program exit", function()
  it("terminates daemonic children and joins the others", function()
    local out = H.tmpname("exit")
    local script = H.tmpname("exit.lua")
    local f = io.open(script, "w")
    f:write(("package.path = %q package.cpath = %q\n"):format(package.path, package.cpath))
    f:write(([[
      local mp = require "multiprocessing"
      local d = mp.Process{ daemon = true, target = function() while true do end end }
      d:start()
      local n = mp.Process{ target = function()
        os.execute("sleep 0.2")
        local f = io.open(%q, "w") f:write("joined") f:close()
      end }
      n:start()
      io.write(d.pid, "\n")
    ]]):format(out))
    f:close()
    local p = io.popen("lua5.4 " .. script)
    local dpid = p:read("l")
    p:close()
    os.remove(script)
    assert.are.equal("joined", slurp(out))
    assert.is_nil(io.open("/proc/" .. dpid .. "/stat"), "daemon still running")
  end)
end)

-- Ctrl-C (see H.interrupt_wait): a join gives way to it at once.
describe("SIGINT interrupts a blocked wait", function()
  H.leakcheck()
  local interrupt = H.interrupt_wait

  it("in Process:join() of a grandchild (which the exit path then terminates)", function()
    local e <close> = mp.Event()
    local code = interrupt(function(ready)
      local g = mp.Process{ daemon = true, target = function() e:wait(60) end }
      g:start()
      ready()
      g:join()
    end)
    assert.are.equal(1, code)
  end)

  it("in a child of the lua5.4 interpreter, whose exit path reports it and exits 1", function()
    -- (run_lua gives the program this process's module paths)
    local out, code = H.run_lua([[
      local mp = require "multiprocessing"
      local core = require "multiprocessing.core"
      local e, ready = mp.Event(), mp.Event()
      local p = mp.Process{ name = "waiter", target = function() ready:set() e:wait(30) end }
      p:start()
      ready:wait(10)
      e:wait(0.1)
      p:interrupt()
      local code = p:join(10)                -- its wait is for 30 s
      if not code then p:kill() p:join(5) end
      io.write("code=", tostring(code), "\n")
    ]], 30)
    assert.are.equal(0, code, out)
    assert.truthy(out:find("code=1\n", 1, true), out)
    assert.truthy(out:find("Process waiter %(pid %d+%):\ninterrupted!"), out)
    assert.truthy(out:find("in method 'wait'", 1, true), out)
  end)

  it("and a join whose signal's handler raises nothing resumes and returns the exit code", function()
    local go <close> = mp.Event()
    local e <close> = mp.Event()
    local p = H.start(function()
      local g = mp.Process{ target = function() e:wait(30) os.exit(3) end }
      g:start()
      -- signals come: still times out, on time
      local c, why = H.nop_timed_wait(go, function(t) return g:join(t) end)
      if c ~= nil or why ~= "timeout" then return 4 end
      c = g:join()                         -- ends after more signals
      local _, n = core._test.nop_signal()
      return (c == 3 and n >= 5) and 0 or 5
    end)
    H.nop_signals(p, go)
    e:set()
    assert.are.equal(0, H.finish(p))
  end)
end)

describe("Process details", function()
  H.leakcheck()

  it("p.ident is the pid, nil before start", function()
    local p = mp.Process{ target = function() end }
    assert.is_nil(p.ident)
    p:start()
    assert.are.equal(p.pid, p.ident)
    assert.are.equal(0, p:join(30))
    assert.are.equal(core.getpid(), mp.current_process().ident)
  end)

  it("authkey: 32 random bytes of the main process, the same in children "
     .. "under every start method; a key set before start is the child's", function()
    H.run_ok([[
      local mp = require "multiprocessing"
      local key = mp.current_process().authkey
      local function same(k) os.exit(mp.current_process().authkey == k and 0 or 7) end
      if mp.is_main() then
        assert(type(key) == "string" and #key == 32)
        assert(mp.current_process().authkey == key)          -- made once
        for _, m in ipairs{"fork", "spawn", "forkserver"} do
          local p = mp.get_context(m).Process{target = same, args = {key}}
          assert(p.authkey == key)
          p:start()
          assert(p:join(30) == 0, m)
        end
        local p = mp.Process{target = same, args = {"another key"}}
        p.authkey = "another key"
        p:start()
        assert(p:join(30) == 0, "set key")
        local pool = mp.Pool(1)
        assert(pool:apply(function() return mp.current_process().authkey end) == key)
        pool:close(); pool:join()
        require("multiprocessing.spawn")._forkserver_stop()
        print("ok")
      end
    ]], 60)
    -- another program has another key
    local k1 = H.run_lua([[io.write(require("multiprocessing").current_process().authkey)]])
    local k2 = H.run_lua([[io.write(require("multiprocessing").current_process().authkey)]])
    assert.are.equal(32, #k1)
    assert.are_not.equal(k1, k2)
  end)

  it("freeze_support and allow_connection_pickling are accepted", function()
    assert.is_nil(mp.freeze_support())
    assert.is_nil(mp.allow_connection_pickling())
  end)
end)
