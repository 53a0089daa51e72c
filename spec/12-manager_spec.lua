-- Managers: every proxy type and method, proxies across processes and
-- start methods, a holder that dies, a manager that dies, remote managers
-- with right and wrong keys, hostile peers, and what is left behind.
local H = require "helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local connection = require "multiprocessing.connection"

local start = H.start   -- a child running fn(...), exiting with what fn returns

-- the manager directories under /tmp
local function dirs()
  local p = io.popen("ls -d /tmp/mp-manager-* 2>/dev/null")
  local n = 0
  for _ in p:lines() do n = n + 1 end
  p:close()
  return n
end

local function remote_error(fn, pattern)
  local ok, err = pcall(fn)
  assert.is_false(ok)
  assert.is_true(mp.RemoteError:is(err), tostring(err))
  if pattern then assert.truthy(tostring(err.message):find(pattern, 1, true), err.message) end
  return err
end

describe("Manager arguments", function()
  H.leakcheck()

  it("rejects bad options and typeids", function()
    assert.has_error(function() mp.Manager(5) end)
    assert.has_error(function() mp.BaseManager{ nope = 1 } end)
    assert.has_error(function() mp.BaseManager{ address = 5 } end)
    assert.has_error(function() mp.BaseManager{ authkey = "" } end)
    assert.has_error(function() mp.BaseManager{ start_method = "vfork" } end)
    -- in the one form of the library's argument errors, at the caller's line
    local ok, err = pcall(function() mp.BaseManager{ nope = 1 } end)
    assert.is_false(ok)
    assert.matches("12%-manager_spec%.lua:%d+: bad argument #1 to 'BaseManager' "
                   .. "%(unknown option 'nope'%)$", err)
    local m = mp.BaseManager()
    assert.has_error(function() m:register("_x", function() end) end)
    assert.has_error(function() m:register("start", function() end) end)
    assert.has_error(function() m:register("x", 5) end)
    assert.has_error(function() m:register("x", nil, { exposed = "add" }) end)
    assert.has_error(function() m:register("x", nil, { proxytype = "set" }) end)
    assert.has_error(function() m:register("x", nil, { what = 1 }) end,
                     "bad argument #3 to 'register' (unknown option 'what')")
    assert.has_error(function() m:register("x", 5) end,
                     "bad argument #2 to 'register' (callable expected, got number)")
    assert.has_error(function() m:register("x", nil, { proxytype = "set" }) end,
                     "bad argument #3 to 'register' ('proxytype' must be \"dict\", "
                     .. "\"list\" or \"Namespace\", got set)")
    assert.has_error(function() m:connect() end)            -- no address
    assert.has_error(function() m:serve_forever() end)      -- no address
  end)

  it("refuses to make objects before it runs, and to start twice", function()
    local m = mp.SyncManager()
    local ok, err = pcall(m.dict, m)
    assert.is_false(ok)
    assert.is_true(mp.ProcessError:is(err))
    m:start()
    assert.has_error(function() m:start() end)
    assert.has_error(function() m:register("late", function() return {} end) end)
    m:shutdown()
    m:shutdown()                                           -- twice is fine
    assert.truthy(tostring(m):find("shutdown", 1, true))
  end)
end)

describe("Manager lifecycle", function()
  H.leakcheck()

  it("__gc of a started manager reaps its server and removes its directory", function()
    local d0 = dirs()
    do
      local m = mp.Manager()
      local d = m:dict()
      d.x = 1
      m = nil                                              -- luacheck: ignore 311
      collectgarbage(); collectgarbage()
      assert.are.equal(1, d.x)                             -- its proxies keep it alive
    end
    collectgarbage(); collectgarbage()
    assert.are.equal(d0, dirs())
  end)

  it("<close> shuts it down on an error too", function()
    local d0 = dirs()
    local ok = pcall(function()
      local m <close> = mp.Manager()
      m:dict()
      error("out")
    end)
    assert.is_false(ok)
    assert.are.equal(d0, dirs())
  end)

  it("tostring names the manager and its state", function()
    local m = mp.Manager()
    assert.truthy(tostring(m):find("^<SyncManager%(.*manager%.sock, started%)>$"), tostring(m))
    m:shutdown()
    assert.truthy(tostring(m):find("shutdown%)>$"))
    assert.truthy(tostring(mp.BaseManager()):find("initial"))
  end)
end)

describe("Manager proxies", function()
  local m, d0
  setup(function() d0 = dirs(); m = mp.Manager() end)
  teardown(function()
    m:shutdown()
    assert.are.equal(d0, dirs())                           -- its socket's directory is gone
  end)

  it("dict: items, every method, any key", function()
    local d = m:dict{ a = 1, b = 2 }
    assert.are.equal(1, d.a)
    d.c = 3; d[5] = "five"; d._hidden = "h"; d[true] = false
    assert.are.equal("h", d._hidden)                       -- "_" keys are keys
    assert.are.equal(false, d[true])
    assert.are.equal(6, #d)
    d.c = nil
    assert.are.equal(5, #d)
    assert.is_nil(d.c)
    assert.are.equal(1, d:get("a"))
    assert.are.equal("dflt", d:get("zz", "dflt"))
    d:update{ get = "key named get" }
    assert.are.equal("key named get", d:get("get"))        -- method names: reach them with get
    assert.are.equal("function", type(d.get))
    local keys = d:keys()
    table.sort(keys, function(x, y) return tostring(x) < tostring(y) end)
    assert.are.equal(6, #keys)
    assert.are.equal(6, #d:values())
    assert.are.equal(6, #d:items())
    assert.are.equal(2, d:pop("b"))
    assert.are.equal("none", d:pop("b", "none"))
    assert.are.equal(1, d:setdefault("a", 9))
    assert.are.equal(9, d:setdefault("n", 9))
    local copy = d:copy()
    assert.is_nil(getmetatable(copy))
    assert.are.equal(9, copy.n)
    assert.are.same(copy, d:totable())
    local seen = 0
    for k, v in pairs(d) do seen = seen + 1; assert.are.equal(copy[k], v) end
    assert.are.equal(#d, seen)
    assert.are.equal(10, d:incr("n"))
    assert.are.equal(15, d:incr("n", 5))
    assert.are.equal(2.5, d:incr("f", 2.5))
    local k = 3
    assert.are.equal(45, d:apply("n", function(v, x) return v * x end, k))
    assert.are.equal("45!", d:apply("n", function(v) return v .. "!" end))
    remote_error(function() d:incr("n") end, "not a number")
    remote_error(function() d:apply("n", function() error("boom") end) end, "boom")
    d:clear()
    assert.are.equal(0, #d)
    assert.has_error(function() d[nil] = 1 end)
  end)

  it("list: items, every method", function()
    local l = m:list{ 10, 20, 30 }
    assert.are.equal(3, #l)
    assert.are.equal(20, l[2])
    assert.are.equal(30, l[-1])
    assert.is_nil(l[4])
    assert.is_nil(l.nope)
    l[2] = 21
    l[4] = 40                                              -- l[#l + 1] appends
    l:append(50)
    l:extend{ 60, 70 }
    l:insert(1, 0)
    assert.are.same({ 0, 10, 21, 30, 40, 50, 60, 70 }, l:totable())
    assert.are.equal(70, l:pop())
    assert.are.equal(0, l:pop(1))
    assert.is_true(l:remove(40))
    assert.is_false(l:remove(99))
    assert.are.equal(3, l:index(30))
    assert.is_nil(l:index(99))
    assert.are.equal(22, l:incr(2))
    assert.are.equal(12, l:apply(1, function(v) return v + 2 end))
    local got = {}
    for i, v in ipairs(l) do got[i] = v end
    assert.are.same(l:totable(), got)
    local n = 0
    for i, v in pairs(l) do n = n + 1; assert.are.equal(got[i], v) end
    assert.are.equal(#got, n)
    remote_error(function() l[10] = 1 end, "out of range")
    remote_error(function() l:append(nil) end, "cannot be nil")
    remote_error(function() l:insert(99, 1) end, "out of range")
    assert.has_error(function() l.x = 1 end)
    local e = m:list()
    assert.is_nil(e:pop())
    assert.are.equal(0, #e)
  end)

  it("Namespace: fields, and none starting with '_'", function()
    local ns = m:Namespace()
    ns.x = 1
    ns.name = "n"
    assert.are.equal(1, ns.x)
    assert.is_nil(ns.y)
    assert.has_error(function() ns._x = 1 end)
    assert.has_error(function() return ns._y end)
    local t = {}
    for k, v in pairs(ns) do t[k] = v end
    assert.are.same({ x = 1, name = "n" }, t)
    remote_error(function() m:Namespace{ _bad = 1 } end, "'_'")
  end)

  it("nested proxies stay references; copies are plain", function()
    local d = m:dict()
    local sub = m:dict{ a = 1 }
    d.sub = sub
    d.sub.a = 2
    assert.are.equal(2, sub.a)
    local l = m:list{ sub }
    l[1].b = 3
    assert.are.equal(3, sub.b)
    assert.truthy(tostring(d.sub):find("dictProxy", 1, true))
  end)

  it("Queue and JoinableQueue", function()
    local q = m:Queue(2)
    assert.is_true(q:put(1))
    assert.is_true(q:put_nowait(2))
    assert.are.same({ nil, "full" }, { q:put(3, 0) })
    assert.are.same({ nil, "timeout" }, { q:put(3, 0.05) })
    assert.is_true(q:full())
    assert.are.equal(2, q:qsize())
    assert.are.equal(1, q:get())
    assert.are.equal(2, q:get_nowait())
    assert.is_true(q:empty())
    assert.are.same({ nil, "empty" }, { q:get(0) })
    assert.are.same({ nil, "timeout" }, { q:get(0.05) })
    remote_error(function() q:put(nil) end, "nil")
    remote_error(function() q:get(-1) end, "timeout")
    remote_error(function() q:task_done() end, "JoinableQueue")
    q:close(); q:join_thread(); q:cancel_join_thread()

    local jq = m:JoinableQueue()
    jq:put("a"); jq:put("b")
    assert.are.same({ nil, "timeout" }, { jq:join(0.05) })
    local p = start(function(qq)
      for _ = 1, 2 do qq:get(10); qq:task_done() end
    end, jq)
    assert.is_true(jq:join(10))
    assert.are.equal(0, H.finish(p))
    remote_error(function() jq:task_done() end, "too many")
  end)

  it("a blocked get does not block others; a put wakes it", function()
    local q, d = m:Queue(), m:dict()
    local p = start(function(qq, dd) dd.got = qq:get() end, q, d)
    assert(H.wait_until(function() return m:info().parked == 1 end, 10))
    for i = 1, 50 do d.i = i end                           -- answered while the child waits
    assert.are.equal(50, d.i)
    q:put("hello")
    assert.are.equal(0, H.finish(p))
    assert.are.equal("hello", d.got)
  end)

  it("Lock and RLock", function()
    local l = m:Lock()
    H.lock_once(l)
    remote_error(function() l:release() end, "unlocked")
    assert.are.same({ 7, 8 }, { l:with(function(a) return a, a + 1 end, 7) })
    assert.is_false(l:locked())
    assert.has_error(function() l:with(function() error("in with") end) end)
    assert.is_false(l:locked())
    local r = m:RLock()
    assert.is_true(r:acquire()); assert.is_true(r:acquire())
    r:release()
    assert.is_true(r:locked())
    local p = start(function(rr)
      local got = rr:acquire(0.05)
      local ok = pcall(rr.release, rr)
      return (got == false and not ok) and 0 or 3
    end, r)
    assert.are.equal(0, H.finish(p))
    r:release()
    assert.is_false(r:locked())
    remote_error(function() l:acquire("x") end, "timeout")
  end)

  it("a lock is handed over when released (FIFO)", function()
    local l, d = m:Lock(), m:dict()
    assert.is_true(l:acquire())
    local p = start(function(ll, dd)
      assert(ll:acquire(10)); dd.child = "in"; ll:release()
    end, l, d)
    H.wait_until(function() return m:info().parked == 1 end, 10)
    assert.is_nil(d.child)
    l:release()
    assert.are.equal(0, H.finish(p))
    assert.are.equal("in", d.child)
  end)

  it("Semaphore and BoundedSemaphore", function()
    local s = m:Semaphore(2)
    assert.is_true(s:acquire()); assert.is_true(s:acquire())
    assert.are.equal(0, s:get_value())
    assert.is_false(s:acquire(0.05))
    s:release(); s:release(); s:release()
    assert.are.equal(3, s:get_value())
    assert.are.equal("x", s:with(function() return "x" end))
    local b = m:BoundedSemaphore(1)
    assert.is_true(b:acquire())
    b:release()
    remote_error(function() b:release() end, "too many")
    remote_error(function() m:Semaphore(-1) end, ">= 0")
    assert.are.equal(1, m:Semaphore():get_value())
  end)

  it("Condition: wait, notify, notify_all, wait_for", function()
    local c, d = m:Condition(), m:dict{ n = 0 }
    remote_error(function() c:wait(0) end, "un-acquired")
    remote_error(function() c:notify() end, "un-acquired")
    assert.is_true(c:acquire())
    assert.is_false(c:wait(0.05))                          -- times out, lock taken back
    assert.is_true(c:locked())
    c:release()
    local ps = {}
    for i = 1, 2 do
      ps[i] = start(function(cc, dd)
        cc:acquire()
        dd:incr("waiting")
        local ok = cc:wait(10)
        dd:incr("woken")
        cc:release()
        return ok and 0 or 3
      end, c, d)
    end
    H.wait_until(function() return d.waiting == 2 and m:info().parked == 2 end, 10)
    c:acquire(); c:notify(); c:release()
    H.wait_until(function() return d.woken == 1 end, 10)
    assert.are.equal(1, d.woken)
    c:acquire(); c:notify_all(); c:release()
    for i = 1, 2 do assert.are.equal(0, H.finish(ps[i])) end
    assert.are.equal(2, d.woken)
    -- wait_for, with a lock of the manager
    local lk = m:Lock()
    local c2 = m:Condition(lk)
    local p = start(function(cc, dd) cc:acquire(); dd.ready = true; cc:notify_all(); cc:release() end, c2, d)
    c2:acquire()
    assert.is_true(c2:wait_for(function() return d.ready end, 10))
    assert.is_true(lk:locked())
    c2:release()
    assert.are.equal(0, H.finish(p))
    c2:acquire()
    assert.is_nil(c2:wait_for(function() return d.never end, 0.05))
    c2:release()
    remote_error(function() m:Condition(m:dict()) end, "Lock or RLock")
  end)

  it("Event", function()
    local e = m:Event()
    assert.is_false(e:is_set())
    assert.is_false(e:wait(0.05))
    local p = start(function(ee) return ee:wait(10) and 0 or 3 end, e)
    H.wait_until(function() return m:info().parked == 1 end, 10)
    e:set()
    assert.are.equal(0, H.finish(p))
    assert.is_true(e:wait())
    e:clear()
    assert.is_false(e:is_set())
  end)

  it("Barrier: indexes, action, timeout, abort, reset", function()
    local d = m:dict()
    local b = m:Barrier(3, function() end)
    assert.are.equal(3, b.parties)
    assert.are.equal(0, b.n_waiting)
    assert.is_false(b.broken)
    local ps = {}
    for i = 1, 2 do
      ps[i] = start(function(bb, dd, k) dd[k] = bb:wait(10) end, b, d, i)
    end
    H.wait_until(function() return b.n_waiting == 2 end, 10)
    local mine = b:wait(10)
    for i = 1, 2 do assert.are.equal(0, H.finish(ps[i])) end
    local idx = { mine, d[1], d[2] }
    table.sort(idx)
    assert.are.same({ 1, 2, 3 }, idx)
    -- a party that times out breaks it for all
    local p = start(function(bb, dd) dd.r = table.pack(bb:wait(10)) end, b, d)
    H.wait_until(function() return b.n_waiting == 1 end, 10)
    assert.are.same({ nil, "timeout" }, { b:wait(0.05) })
    assert.are.equal(0, H.finish(p))
    assert.are.equal("broken", d.r[2])
    assert.is_true(b.broken)
    assert.are.same({ nil, "broken" }, { b:wait(0) })
    b:reset()
    assert.is_false(b.broken)
    b:abort()
    assert.is_true(b.broken)
    local one = m:Barrier(1)
    assert.are.equal(1, one:wait())
    remote_error(function() m:Barrier(0) end, "parties")
  end)

  it("Value and Array", function()
    local v = m:Value("int64", 5)
    assert.are.equal(5, v.value)
    v.value = 7
    assert.are.equal(7, v:get())
    v:set(8)
    assert.are.equal(8, v.value)
    remote_error(function() v.value = "x" end, "integer")
    assert.has_error(function() v.other = 1 end)
    local f = m:Value("d", 1)
    assert.are.equal(1.0, f.value)
    assert.are.equal("float", math.type(f.value))
    remote_error(function() m:Value("int8", 300) end, "range")
    remote_error(function() m:Value("nope", 1) end, "unknown type")
    local a = m:Array("i", 3)
    assert.are.equal(3, #a)
    assert.are.same({ 0, 0, 0 }, a:totable())
    a[2] = 9
    assert.are.equal(9, a[2])
    assert.is_nil(a[4])
    remote_error(function() a[4] = 1 end, "out of range")
    local b = m:Array("double", { 1, 2.5 })
    local t = {}
    for i, x in ipairs(b) do t[i] = x end
    assert.are.same({ 1.0, 2.5 }, t)
  end)

  it("a value with fds (a Pipe's end) goes by the socket, the rest by the channel", function()
    local d = m:dict()
    local a, b = mp.Pipe()
    d.conn = b                                             -- a queue cannot carry its fd
    d.x = 1
    local b2 = d.conn                                      -- nor can the answer
    assert.are.equal(1, d.x)
    a:send("through")
    assert.are.equal("through", b2:recv(5))
    a:close(); b:close(); b2:close()
    d.conn = nil
  end)

  it("works the same without a channel (the socket only)", function()
    local client = require "multiprocessing.managers.client"
    client.CHANNEL = false
    local ok, err = pcall(function()
      local m2 <close> = mp.Manager()
      local d, q = m2:dict{ a = 1 }, m2:Queue()
      d:incr("a")
      q:put("x")
      assert.are.equal(2, d.a)
      assert.are.equal("x", q:get(5))
      assert.are.same({ nil, "timeout" }, { q:get(0.02) })
    end)
    client.CHANNEL = true
    assert(ok, tostring(err))
  end)

  it("proxy calls with a bad self raise", function()
    local d = m:dict()
    assert.has_error(function() d.keys({}) end)
    assert.has_error(function() m.dict({}) end)
    local ok, err = pcall(m.dict, m, 5)
    assert.is_false(ok)
    assert.is_true(mp.RemoteError:is(err))
    assert.truthy(err.traceback)
    assert.are.equal("number", type(err.pid))
  end)
end)

describe("Managers across processes", function()
  H.leakcheck()

  it("4 processes increment one counter exactly", function()
    local m <close> = mp.Manager()
    local d = m:dict{ n = 0 }
    local ps = {}
    for i = 1, 4 do
      ps[i] = start(function(dd) for _ = 1, 500 do dd:incr("n") end end, d)
    end
    for i = 1, 4 do assert.are.equal(0, H.finish(ps[i])) end
    assert.are.equal(2000, d.n)
  end)

  it("proxies travel through Pipes and Queues, and a forked proxy opens its own connection", function()
    local m <close> = mp.Manager()
    local d = m:dict()
    d.x = 1                                                -- the parent's connection is open
    local a, b = mp.Pipe()
    local q = mp.Queue()
    local p = start(function(bb, qq)
      local dd = bb:recv(10)
      dd.from_pipe = true
      local ll = qq:get(10)
      ll:append("from queue")
    end, b, q)
    a:send(d)
    local l = m:list()
    q:put(l)
    assert.are.equal(0, H.finish(p))
    assert.is_true(d.from_pipe)
    assert.are.same({ "from queue" }, l:totable())
    assert.are.equal(1, d.x)                               -- still in step after the fork
    a:close(); b:close(); q:close()
  end)

  it("a short timed wait times out while a longer one parked before it still waits", function()
    local m <close> = mp.Manager()
    local long, short = m:Queue(), m:Queue()
    local d = m:dict{ parked = false }
    local p = start(function(q, dd)
      dd.parked = true
      local v = q:get(120)                                  -- parked first, deadline far
      return v == "late" and 0 or 3
    end, long, d)
    assert.is_true(H.wait_until(function() return d.parked end, 30))
    H.sleep(0.1)                                           -- the child's get reaches the server
    assert.are.same({ nil, "timeout" }, { short:get(0.2) })  -- the nearer deadline ends first
    assert.is_true(p:is_alive())                           -- the far one still waits
    long:put("late")
    assert.are.equal(0, H.finish(p))
  end)

  it("a manager object travels as a client of its server", function()
    local m <close> = mp.Manager()
    local d = m:dict()
    local p = start(function(mm, dd)
      local l = mm:list{ 1, 2 }
      dd.l = l
      mm:shutdown()                                        -- not its to stop: nothing happens
    end, m, d)
    assert.are.equal(0, H.finish(p))
    assert.are.same({ 1, 2 }, d.l:totable())
  end)

  it("custom types: register, exposed, proxytype, client-side register", function()
    local Counter = {}
    Counter.__index = Counter
    function Counter.add(self, n) self.total = self.total + n; return self.total end
    function Counter.get(self) return self.total end
    function Counter._secret() return "no" end
    local jobs = { "a", "b" }
    local m <close> = mp.BaseManager()
    m:register("Counter", function(start_at) return setmetatable({ total = start_at or 0 }, Counter) end)
    m:register("Limited", function() return setmetatable({ total = 0 }, Counter) end, { exposed = { "get" } })
    m:register("jobs", function() return jobs end, { proxytype = "list" })
    m:start()
    local c = m:Counter(10)
    assert.are.equal(15, c:add(5))
    assert.are.equal(15, c:get())
    assert.is_nil(c._secret)
    local lim = m:Limited()
    assert.are.equal(0, lim:get())
    assert.is_nil(lim.add)
    local j = m:jobs()
    j:append("c")
    assert.are.same({ "a", "b", "c" }, m:jobs():totable())   -- the same object
    local client = mp.BaseManager{ address = m.address, authkey = m._authkey }
    client:register("Counter")
    client:connect()
    local c2 = client:Counter(1)
    assert.are.equal(3, c2:add(2))
    assert.is_nil(client.jobs)                             -- not registered here
  end)

  it("serve_forever serves in this process until a client shuts it down", function()
    local path = H.tmpname("mgr.sock")
    local p = start(function(addr)
      local m = mp.BaseManager{ address = addr, authkey = "k" }
      m:register("box", function() return { v = 1 } end, { proxytype = "dict" })
      m:serve_forever()
      return 0
    end, path)
    finally(function()            -- a failed assert leaves no server behind
      if p._state == "started" and p:is_alive() then p:kill(); p:join(5) end
      os.remove(path)
    end)
    local c = mp.BaseManager{ address = path, authkey = "k" }
    c:register("box")
    assert(H.wait_until(function() return pcall(c.connect, c) end, 10))
    assert.are.equal(1, c:box().v)
    require("multiprocessing.managers")._call(path, "k", 0, "shutdown")
    assert.are.equal(0, H.finish(p, 10))
    local ok, err = pcall(c.info, c)                       -- it is gone now
    assert.is_false(ok)
    assert.is_true(mp.ProcessError:is(err))
    os.remove(path)
  end)

  it("ctx:Manager() and ctx.Manager() start with the context's method", function()
    local ctx = mp.get_context("fork")
    local m <close> = ctx:Manager()
    local m2 <close> = ctx.Manager()
    assert.are.equal(1, m:dict{ a = 1 }.a)
    assert.are.equal(2, m2:dict{ a = 2 }.a)
  end)
end)

for _, method in ipairs({ "spawn", "forkserver" }) do
  describe("Managers under " .. method, function()
    it("the server and a child get proxies and use them", function()
      local src = ("package.path = %q\npackage.cpath = %q\n"):format(package.path, package.cpath) .. [[
        local mp = require "multiprocessing"
        mp.set_start_method("]] .. method .. [[")
        local function child(d, l, lk, q)
          assert(lk:acquire(10))
          d.pid = mp.current_process().pid
          d:incr("n", 5)
          l:append("child")
          lk:release()
          q:put("done")
        end
        if mp.is_main() then
          local m = mp.Manager()
          local d, l, lk, q = m:dict{ n = 1 }, m:list(), m:Lock(), m:Queue()
          local p = mp.Process{ target = child, args = { d, l, lk, q } }
          p:start()
          print("got=" .. tostring(q:get(20)))
          print("join=" .. tostring(p:join(20)))
          print("n=" .. d.n, "list=" .. table.concat(l:totable(), ","),
                "other=" .. tostring(d.pid ~= mp.current_process().pid))
          -- the args' transit references were adopted by the child, and
          -- went with its connection: each object has this process's only
          local monotonic = require("multiprocessing.core").monotonic
          local refs, deadline = "", monotonic() + 10
          repeat
            local t = {}
            for _, o in ipairs(m:_debug_info()) do t[#t + 1] = o.refs .. "/" .. o.transit end
            refs = table.concat(t, ",")
          until refs == "1/0,1/0,1/0,1/0" or monotonic() > deadline
          print("refs=" .. refs)
          m:shutdown()
          print("end=ok")
        end
      ]]
      local out, code = H.run_lua(src, 60)
      assert.are.equal(0, code, out)
      for _, want in ipairs({ "got=done", "join=0", "n=6", "list=child", "other=true",
                              "refs=1/0,1/0,1/0,1/0\n", "end=ok" }) do
        assert.truthy(out:find(want, 1, true), out)
      end
    end)
  end)
end

describe("Managers and failures", function()
  H.leakcheck()

  it("a holder killed while holding a lock or semaphore: the next acquire is 'abandoned'", function()
    local m <close> = mp.Manager()
    local lk, sem, ev = m:Lock(), m:Semaphore(1), m:Event()
    local p = start(function(l, s, e)
      assert(l:acquire(10)); assert(s:acquire(10)); e:set()
      H.sleep(60)
    end, lk, sem, ev)
    assert.is_true(ev:wait(10))
    assert.is_false(lk:acquire(0))
    local waiter = start(function(l) return l:acquire(20) and 0 or 3 end, lk)
    H.wait_until(function() return m:info().parked == 1 end, 10)
    p:kill()
    p:join(10)
    p:close()
    assert.are.equal(0, H.finish(waiter))                 -- it got the lock
    -- the waiter died holding it too: abandoned again
    assert.are.same({ true, "abandoned" }, { lk:acquire(10) })
    lk:release()
    assert.are.same({ true }, { lk:acquire(0) })          -- once only
    lk:release()
    assert.are.same({ true, "abandoned" }, { sem:acquire(10) })
    assert.are.equal(0, sem:get_value())
  end)

  it("a dead manager: every proxy call raises ProcessError naming it, at once", function()
    local m = mp.Manager()
    local d, q = m:dict(), m:Queue()
    d.x = 1
    local p = start(function(qq)
      local ok, err = pcall(qq.get, qq)                    -- blocked when the server dies
      return (not ok and mp.ProcessError:is(err)) and 0 or 3
    end, q)
    H.wait_until(function() return m:info().parked == 1 end, 10)
    m._process:kill()
    m._process:join(10)
    local t0 = core.monotonic()
    for _ = 1, 3 do
      local ok, err = pcall(function() return d.x end)
      assert.is_false(ok)
      assert.is_true(mp.ProcessError:is(err), tostring(err))
      assert.truthy(err.message:find(m.address, 1, true), err.message)
    end
    local ok, err = pcall(m.dict, m)
    assert.is_false(ok)
    assert.is_true(mp.ProcessError:is(err))
    assert.is_true(core.monotonic() - t0 < 5)
    assert.are.equal(0, H.finish(p))
    m:shutdown()
  end)

  it("a remote manager on 127.0.0.1: the right key works, a wrong one is refused", function()
    local m <close> = mp.BaseManager{ address = "127.0.0.1:0", authkey = "right key" }
    local store = {}
    m:register("store", function() return store end, { proxytype = "dict" })
    m:start()
    assert.truthy(m.address:match("^127%.0%.0%.1:%d+$"))
    local bad = mp.BaseManager{ address = m.address, authkey = "wrong key" }
    local ok, err = pcall(bad.connect, bad)
    assert.is_false(ok)
    assert.is_true(mp.AuthenticationError:is(err), tostring(err))
    local good = mp.BaseManager{ address = m.address, authkey = "right key" }
    good:register("store")
    good:connect()
    local s = good:store()
    s.k = "v"
    assert.are.equal("v", m:store().k)
    assert.is_true(m:info().refused >= 1)
    local child = start(function(st) st.child = true end, s)
    assert.are.equal(0, H.finish(child))
    assert.is_true(s.child)
  end)

  -- A peer that writes raw bytes (bash's /dev/tcp): script runs with the
  -- socket as fd 3; returns the popen handle (close it to wait for it).
  local function raw_peer(host, port, script)
    return io.popen(("bash -c 'exec 3<>/dev/tcp/%s/%s; %s' 2>/dev/null")
                    :format(host, port, script), "r")
  end

  it("hostile peers: garbage, a huge length, a slow sender, many connections", function()
    local m <close> = mp.BaseManager{ address = "127.0.0.1:0", authkey = "k" }
    m:register("store", function() return {} end, { proxytype = "dict" })
    m:start()
    local host, port = m.address:match("^(.*):(%d+)$")
    local d = m:store()
    local raw = {
      raw_peer(host, port, [[printf 'GET / HTTP/1.1\r\n\r\n' >&3; sleep 1]]),
      raw_peer(host, port, [[printf '\xff\xff\xff\xff\xff\xff\xff\x3f\x00\x00\x00\x00\x00\x00\x00\x00' >&3; sleep 1]]),
      raw_peer(host, port, [[printf '\x28\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00' >&3;
                             for i in 1 2 3 4 5 6 7 8 9 10; do printf x >&3; sleep 0.1; done]]),
    }
    local peers = {}
    for i = 1, 100 do                                      -- more than HANDSHAKE_PENDING
      local c = core.connect(host, port)
      peers[#peers + 1] = c
      if i % 4 == 0 then c:send_bytes(string.rep("\255", 64)) end   -- a wrong digest
    end
    for i = 1, 20 do
      d[i] = i                                             -- the good client is answered
      H.sleep(0.02)
    end
    assert.are.equal(20, #d)
    local info = m:info()
    assert.is_true(info.pending <= connection.HANDSHAKE_PENDING, tostring(info.pending))
    assert.are.equal(1, info.clients)
    assert.is_true(info.refused >= 1)
    for _, c in ipairs(peers) do c:close() end
    for _, f in ipairs(raw) do f:close() end
    assert.are.equal(20, d[20])
    -- a new good client still gets in
    local p = start(function(dd) dd.late = true end, d)
    assert.are.equal(0, H.finish(p))
    assert.is_true(d.late)
  end)
end)

describe("Managers: object lifetime (reference counting)", function()
  H.leakcheck()

  -- the objects the server holds, once this process's dropped proxies are
  -- collected (their references go with the call itself)
  local function objects(m)
    collectgarbage(); collectgarbage()
    return m:_number_of_objects()
  end

  it("1000 short-lived dicts: the server's object count stays small", function()
    local m <close> = mp.Manager()
    local keep = m:dict{ kept = true }
    local most = 0
    for i = 1, 1000 do
      local d = m:dict{ i = i }
      d.x = i
      assert.are.equal(i, d.i)
      if i % 100 == 0 then
        collectgarbage()
        local n = m:info().objects               -- no full collection in the server
        if n > most then most = n end
      end
    end
    assert.is_true(most <= 150, "at most " .. most .. " objects at once")
    assert.are.equal(1, objects(m))
    assert.is_true(keep.kept)                    -- the one still referenced lives
    keep = nil                                   -- luacheck: ignore
    assert.are.equal(0, objects(m))
  end)

  it("_debug_info shows each object's references", function()
    local m <close> = mp.Manager()
    local d, l = m:dict(), m:list()
    local info = m:_debug_info()
    assert.are.equal(2, #info)
    assert.are.same({ "dict", 1, 0 }, { info[1].kind, info[1].refs, info[1].transit })
    assert.are.same({ "list", 1, 0 }, { info[2].kind, info[2].refs, info[2].transit })
    assert.truthy(d and l)
  end)

  it("timed-out waits do not pile up in an idle object's waiter lists", function()
    local m <close> = mp.Manager()
    local q, ev, lk = m:Queue(), m:Event(), m:Lock()
    assert.is_true(lk:acquire())
    local p = start(function(qq, e, l)      -- another client polls all three
      for _ = 1, 100 do
        if qq:get(0.001) ~= nil or e:wait(0.001) or l:acquire(0.001) then return 3 end
      end
      return 0
    end, q, ev, lk)
    assert.are.equal(0, H.finish(p, 60))
    for _, o in ipairs(m:_debug_info()) do
      assert.is_true(o.parked <= 32, o.kind .. " keeps " .. o.parked .. " waiters")
    end
    lk:release()
  end)

  it("a proxy sent through a Pipe or a Queue outlives its sender's (transit reference)", function()
    local m <close> = mp.Manager()
    local a, b = mp.Pipe()
    local q = mp.Queue()
    local go = mp.Event()
    local p = start(function(bb, qq, ev)
      assert(ev:wait(20))                        -- the sender's proxies are gone by now
      local d = bb:recv(10)
      local l = qq:get(10)
      l:append(d.v)
      return d.v == 42 and 0 or 3
    end, b, q, go)
    do
      local d = m:dict{ v = 42 }
      a:send(d)
      q:put(m:list())
    end
    assert.are.equal(2, objects(m))              -- only their transit references left
    for _, o in ipairs(m:_debug_info()) do assert.are.same({ 1, 1 }, { o.refs, o.transit }) end
    go:set()
    assert.are.equal(0, H.finish(p))
    -- the child's references went with its connection (which the server
    -- may see close a moment after the join)
    assert(H.wait_until(function() return objects(m) == 0 end, 10))
    a:close(); b:close(); q:close()
  end)

  it("a proxy encoded twice takes two transit references, each adopted", function()
    local m <close> = mp.Manager()
    local a, b = mp.Pipe()
    local d = m:dict{ v = 1 }
    a:send(d); a:send(d)
    assert.are.equal(2, m:_debug_info()[1].transit)
    local d1, d2 = b:recv(5), b:recv(5)                    -- this process adopts both
    assert.are.equal(1, d1.v)
    local info = m:_debug_info()[1]
    assert.are.same({ 3, 0 }, { info.refs, info.transit })
    d = nil; d1 = nil                                      -- luacheck: ignore
    collectgarbage(); collectgarbage()
    assert.are.equal(1, objects(m))
    assert.are.equal(1, d2.v)
    d2 = nil                                               -- luacheck: ignore
    assert.are.equal(0, objects(m))
    a:close(); b:close()
  end)

  it("a process holding proxies is killed: its references go", function()
    local m <close> = mp.Manager()
    -- d reaches the child through fork's copy of memory only (not p.args,
    -- which would keep the parent's proxy alive)
    local holder = { d = m:dict{ v = 7 } }
    local ready = m:Event()
    local p = start(function(mm, ev)
      local dd = holder.d
      assert(dd.v == 7)                          -- an inherited proxy takes its own reference
      local mine = { mm:dict(), mm:list(), mm:Lock() }
      ev:set()
      H.sleep(60)
      return #mine + dd.v
    end, m, ready)
    assert.is_true(ready:wait(10))
    assert.are.equal(5, objects(m))              -- d, ready, and the child's three
    holder.d = nil
    assert.are.equal(5, objects(m))              -- the child still holds d's object
    p:kill()
    assert.are.equal(-9, p:join(10))
    p:close()
    assert(H.wait_until(function() return objects(m) == 1 end, 10))   -- ready only
  end)

  it("a nested proxy is kept alive by its container, and freed with it", function()
    local m <close> = mp.Manager()
    local outer, l = m:dict(), m:list()
    outer.sub = m:dict{ a = 1 }                  -- no proxy of it is left here
    l:append(m:dict{ b = 2 })
    assert.are.equal(4, objects(m))
    assert.are.equal(1, outer.sub.a)
    assert.are.equal(2, l[1].b)
    outer.sub = nil                              -- overwritten: freed
    assert.are.equal(3, objects(m))
    l:append(m:Lock())
    outer.again = l[1]                           -- two containers hold it
    assert.are.equal(4, objects(m))
    l:pop(1)
    assert.are.equal(4, objects(m))
    outer:clear()
    assert.are.equal(3, objects(m))              -- outer, l and the Lock in l
    l = nil                                      -- luacheck: ignore
    assert.are.equal(1, objects(m))              -- the container went, and what it held
    outer = nil                                  -- luacheck: ignore
    assert.are.equal(0, objects(m))
  end)

  it("a registered callable's shared value: the entry is freed, the value lives on", function()
    local jobs = { "a" }
    local m <close> = mp.BaseManager()
    m:register("jobs", function() return jobs end, { proxytype = "list" })
    m:start()
    local j = m:jobs()
    j:append("b")
    local j2 = m:jobs()                          -- the same object, a second reference
    assert.are.equal(2, #j2)
    assert.are.equal(1, objects(m))
    j = nil; j2 = nil                            -- luacheck: ignore
    assert.are.equal(0, objects(m))
    assert.are.same({ "a", "b" }, m:jobs():totable())   -- the server's table survived
  end)

  it("a proxy in Pool task arguments: each transit reference is adopted, none left over", function()
    local m <close> = mp.Manager()
    local d = m:dict{ n = 0 }
    do
      local pool <close> = mp.Pool(2)
      local rs = {}
      for i = 1, 6 do rs[i] = pool:apply_async(function(dd) return dd:incr("n") end, { d }) end
      for i = 1, 6 do assert.is_number(rs[i]:get(20)) end
      assert.are.equal(42, pool:submit(function(dd, k) return dd.n * k end, d, 7):get(20))
      pool:close()
      pool:join()
    end
    assert.are.equal(6, d.n)
    assert(H.wait_until(function()                 -- the workers' connections closed
      local o = m:_debug_info()[1]
      return o.refs == 1 and o.transit == 0
    end, 10), "refs " .. m:_debug_info()[1].refs .. ", transit " .. m:_debug_info()[1].transit)
  end)

  it("a proxy of a manager that is gone travels without a reference", function()
    local m = mp.Manager()
    local d = m:dict()
    m:shutdown()
    local a, b = mp.Pipe()
    a:send(d)
    local d2 = b:recv(5)
    local ok, err = pcall(function() return d2.x end)
    assert.is_false(ok)
    assert.is_true(mp.ProcessError:is(err), tostring(err))
    a:close(); b:close()
  end)
end)

describe("Managers: method_to_typeid", function()
  H.leakcheck()

  local Counter = {}
  Counter.__index = Counter
  function Counter.new(n) return setmetatable({ n = n or 0 }, Counter) end
  function Counter.add(self, k) self.n = self.n + k; return self.n end
  function Counter.spawn(self) return Counter.new(self.n * 10) end
  function Counter.history(self) return { self.n, self.n + 1 } end
  function Counter.nothing() return nil end

  it("checks its option at register", function()
    local m = mp.BaseManager()
    local function err_of(...)
      local ok, err = pcall(m.register, m, ...)
      assert.is_false(ok)
      return err
    end
    assert.matches("method_to_typeid.*table", err_of("C", Counter.new, { method_to_typeid = "x" }))
    assert.matches("strings", err_of("C", Counter.new, { method_to_typeid = { spawn = 5 } }))
    assert.matches("strings", err_of("C", Counter.new, { method_to_typeid = { "C" } }))
    assert.matches("unknown typeid 'Nope'",
                   err_of("C", Counter.new, { method_to_typeid = { spawn = "Nope" } }))
    assert.matches("not in 'exposed'", err_of("C", Counter.new,
                   { exposed = { "add" }, method_to_typeid = { spawn = "C" } }))
    assert.matches("proxytype", err_of("C", Counter.new,
                   { proxytype = "dict", method_to_typeid = { spawn = "C" } }))
    local s = mp.SyncManager()
    local ok, err = pcall(function()
      s:register("C", Counter.new, { method_to_typeid = { spawn = "Lock" } })
    end)
    assert.is_false(ok)
    assert.matches("cannot serve", err)
    -- the error points at the caller's line
    assert.matches("12%-manager_spec%.lua:%d+:", err)
    -- these are fine: itself, a type registered before, dict/list/Namespace
    m:register("Other", Counter.new)
    m:register("C", Counter.new, { method_to_typeid = { spawn = "C", history = "list",
                                                         add = "Other" } })
  end)

  it("a method's result comes back as a proxy of the given typeid", function()
    local m <close> = mp.BaseManager()
    m:register("Counter", Counter.new, { method_to_typeid = { spawn = "Counter",
                                         history = "list", nothing = "Counter" } })
    m:start()
    local c = m:Counter(2)
    local c2 = c:spawn()                         -- a new Counter in the server
    assert.are.equal("multiprocessing.Proxy", getmetatable(c2).__name)
    assert.are.equal(21, c2:add(1))
    assert.are.equal(2, c:add(0))                -- c is another object
    local h = c:history()                        -- a list proxy of the returned table
    assert.are.equal("multiprocessing.listProxy", getmetatable(h).__name)
    assert.are.same({ 2, 3 }, h:totable())
    h:append(4)
    assert.are.equal(3, #h)
    assert.is_nil(c:nothing())
    -- the proxies travel and count like any other
    do
      local a, b = mp.Pipe()
      local p = start(function(bb) return bb:recv(10):add(1) == 22 and 0 or 3 end, b)
      a:send(c2)
      assert.are.equal(0, H.finish(p))
      a:close(); b:close()
    end
    collectgarbage(); collectgarbage()
    assert.are.equal(3, m:_number_of_objects())
    c2 = nil; h = nil                            -- luacheck: ignore
    assert(H.wait_until(function()               -- the child's connection closed too
      collectgarbage(); collectgarbage()
      return m:_number_of_objects() == 1
    end, 10))
  end)

  it("in a SyncManager, a method can return a dict proxy", function()
    local m <close> = mp.SyncManager()
    m:register("Counter", Counter.new, { method_to_typeid = { history = "dict" } })
    m:start()
    local d = m:Counter(5):history()
    assert.are.equal("multiprocessing.dictProxy", getmetatable(d).__name)
    assert.are.equal(6, d[2])
  end)
end)

describe("Managers: get_server", function()
  H.leakcheck()

  -- Serve srv here until a forked client has run body(address) and shut
  -- the server down (a watchdog does it after 30 s if the client does
  -- not): -> the client's exit code (3: body raised), its pid.
  local function serve_for(srv, body)
    local client = start(function(addr)
      local ok = pcall(body, addr)
      require("multiprocessing.managers")._call(addr, "k", 0, "shutdown")
      return ok and 0 or 3
    end, srv.address)
    local dog = start(function(addr)
      H.sleep(30)
      pcall(require("multiprocessing.managers")._call, addr, "k", 0, "shutdown")
    end, srv.address)
    srv:serve_forever()
    dog:kill(); dog:join(5); dog:close()
    return H.finish(client), client.pid
  end

  it("binds at once (port 0 resolved) and serves here until a client shuts it down", function()
    local m = mp.BaseManager{ address = "127.0.0.1:0", authkey = "k" }
    local store = {}
    m:register("store", function() return store end, { proxytype = "dict" })
    local srv = m:get_server()
    local port = tonumber(srv.address:match("^127%.0%.0%.1:(%d+)$"))
    assert.is_true(port ~= nil and port > 0, srv.address)
    assert.are.equal(srv.address, m.address)
    assert.has_error(function() m:get_server() end)        -- once
    assert.has_error(function() m:serve_forever() end)
    local code, pid = serve_for(srv, function(addr)
      local c = mp.BaseManager{ address = addr, authkey = "k" }
      c:register("store")
      c:connect()
      c:store().from_child = mp.current_process().pid
    end)
    assert.are.equal(0, code)
    assert.are.equal(pid, store.from_child)
    assert.is_number(store.from_child)
    assert.has_error(function() srv:serve_forever() end)   -- it served
    srv:close()
  end)

  it("a child forked after get_server is a client: the proxies it receives give their references back", function()
    local m = mp.BaseManager{ address = "127.0.0.1:0", authkey = "k" }
    local store = {}
    m:register("store", function() return store end, { proxytype = "dict" })
    m:register("fresh", function() return {} end, { proxytype = "dict" })
    local srv = m:get_server()
    assert.are.equal(0, serve_for(srv, function(addr)
      local c = mp.BaseManager{ address = addr, authkey = "k" }
      c:register("store"); c:register("fresh")
      c:connect()
      local st = c:store()
      local before = c:_number_of_objects()
      st.sub = c:fresh()
      local got = st.sub                   -- a proxy in an answer
      got.x = 1
      got = nil                            -- luacheck: ignore 311
      st.sub = nil
      collectgarbage(); collectgarbage()
      st.probe = 1                         -- carries the reference given back
      st.before, st.after = before, c:_number_of_objects()
    end))
    assert.is_number(store.before)
    assert.are.equal(store.before, store.after)    -- the sub-dict is gone
    srv:close()
  end)

  it("a server closed without serving frees its address", function()
    local path = H.tmpname("mgr.sock")
    local m = mp.BaseManager{ address = path, authkey = "k" }
    local srv = m:get_server()
    assert.are.equal(path, srv.address)
    srv:close()
    srv:close()
    assert.truthy(tostring(srv):find("closed", 1, true))
    local m2 = mp.BaseManager{ address = path, authkey = "k" }
    local srv2 <close> = m2:get_server()
    assert.are.equal(path, srv2.address)
  end)
end)
