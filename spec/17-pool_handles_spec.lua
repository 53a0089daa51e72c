-- Pool: handles (Queue, Event, Lock, Value, Pipe ends, manager proxies) in
-- task arguments, in the upvalues of task functions and in results, under
-- every start method; no fd left behind when a worker is killed with
-- handles in flight or when results that hold handles are discarded; a
-- transport that cannot carry fds still raises SerializationError.
local H = require "helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local METHODS = { "fork", "spawn", "forkserver" }

-- Run f(pool, ctx) with a pool of n workers started by method m, always
-- terminated afterwards (and the fork server stopped).
local function with_pool(m, n, f)
  local ctx = mp.get_context(m)
  local pool = ctx.Pool(n)
  local ok, err = pcall(f, pool, ctx)
  pool:terminate()
  if m == "forkserver" then require("multiprocessing.spawn")._forkserver_stop() end
  if not ok then error(err, 0) end
end

-- The n items a queue gives within 10 s, sorted.
local function drain(q, n)
  local got = {}
  for i = 1, n do
    local v = q:get(10)
    assert(v ~= nil, "queue item " .. i .. " did not come")
    got[i] = v
  end
  table.sort(got)
  return got
end

local function range(n, f)
  local t = {}
  for i = 1, n do t[i] = f and f(i) or i end
  return t
end

for _, m in ipairs(METHODS) do
  describe("Pool handles (" .. m .. ")", function()
    H.leakcheck()

    it("a Queue inside map items: every task's progress reaches the parent", function()
      with_pool(m, 2, function(pool, ctx)
        local q = ctx.Queue()
        local items = range(20, function(i) return { q = q, i = i } end)
        local r = pool:map(function(t) t.q:put(t.i * 10); return t.i end, items, 3)
        assert.are.same(range(20), { table.unpack(r, 1, r.n) })
        assert.are.same(range(20, function(i) return i * 10 end), drain(q, 20))
        q:close()
      end)
    end)

    it("an Event given to apply_async: a task waits on it, another sets it", function()
      with_pool(m, 2, function(pool, ctx)
        local ev, ev2 = ctx.Event(), ctx.Event()
        local waiter = pool:apply_async(function(e) return e:wait(10) end, { ev })
        ev:set()
        assert.is_true(waiter:get(10))
        local setter = pool:submit(function(e) e:set(); return "set" end, ev2)
        assert.is_true(ev2:wait(10))
        assert.are.equal("set", setter:get(10))
      end)
    end)

    it("a closure capturing a Queue, run by map; another Queue, same code: its own", function()
      with_pool(m, 2, function(pool, ctx)
        local function job(q)
          return pool:map(function(x) q:put(x); return x * 2 end, range(10))
        end
        local q1, q2 = ctx.Queue(), ctx.Queue()
        assert.are.equal(20, job(q1)[10])
        assert.are.same(range(10), drain(q1, 10))
        assert.are.equal(20, job(q2)[10])   -- same bytes, other handle
        assert.are.same(range(10), drain(q2, 10))
        assert.is_nil(q1:get(0.05))
        q1:close(); q2:close()
      end)
    end)

    it("a task returns handles (a new Pipe, a Value) that the parent uses", function()
      with_pool(m, 2, function(pool)
        local vals = pool:map(function(x)
          return require("multiprocessing").Value("i", x)
        end, { 11, 12, 13 })
        assert.are.same({ 11, 12, 13 }, { vals[1].value, vals[2].value, vals[3].value })
        vals[1].value = 99
        assert.are.equal(99, vals[1].value)
        local a, b = pool:apply(function() return require("multiprocessing").Pipe() end)
        a:send({ hello = "pipe" })
        assert.is_true(b:poll(10))
        assert.are.same({ hello = "pipe" }, b:recv())
        a:close(); b:close()
        -- packed results (imap) and a handle after a plain value
        for i, x, v in pool:imap(function(x)
          return x, require("multiprocessing").Value("d", x / 2)
        end, { 1, 2 }) do
          assert.are.equal(i, x)
          assert.are.equal(i / 2, v.value)
        end
      end)
    end)

    it("the same handle in many items of one map, and twice in one item", function()
      with_pool(m, 2, function(pool, ctx)
        local q = ctx.Queue()
        local items = range(300, function(i) return { q, i, q } end)
        local r = pool:starmap(function(q1, i, q2)
          q1:put(i)
          return rawequal(q1, q2)               -- one handle inside one item
        end, items, 100)
        for i = 1, 300 do assert.is_true(r[i]) end
        assert.are.equal(300, #drain(q, 300))
        q:close()
      end)
    end)

    it("frames with handles queued behind a busy worker (partial writes) keep their own fds", function()
      with_pool(m, 1, function(pool, ctx)
        local q1, q2, ev = ctx.Queue(), ctx.Queue(), ctx.Event()
        local function f(q, s, k) if q then q:put(k) end; return #s end
        pool:starmap(f, { { false, "a", 1 }, { false, "b", 2 } })   -- quick: many chunks ahead
        local blk = pool:apply_async(function(e) return e:wait(20) end, { ev })
        local big = string.rep("x", 60000)
        local r = pool:starmap_async(f, range(60, function(i)
          return { i % 2 == 1 and q1 or q2, big, i }
        end), 1)
        ev:set()
        assert.is_true(blk:get(20))
        local res = r:get(30)
        for i = 1, 60 do assert.are.equal(60000, res[i]) end
        for _, v in ipairs(drain(q1, 30)) do assert.are.equal(1, v % 2) end
        for _, v in ipairs(drain(q2, 30)) do assert.are.equal(0, v % 2) end
        q1:close(); q2:close()
      end)
    end)

    it("a Lock given to tasks that increment a shared Value under it: exact total", function()
      with_pool(m, 2, function(pool, ctx)
        local lock, v = ctx.Lock(), ctx.Value("i", 0)
        pool:starmap(function(l, val, n)
          for _ = 1, n do
            l:acquire()
            val.value = val.value + 1
            l:release()
          end
        end, range(8, function() return { lock, v, 250 } end), 1)
        assert.are.equal(2000, v.value)
      end)
    end)

    it("a manager's proxy as a task argument (it carries no fd)", function()
      with_pool(m, 2, function(pool)
        local man <close> = mp.Manager()
        local d = man:dict()
        pool:map(function(t) t.d:incr("n", t.k) end,
                 range(10, function(i) return { d = d, k = i } end), 2)
        assert.are.equal(55, d.n)
      end)
    end)

    it("holds no more fds after many tasks with handles than after a few", function()
      with_pool(m, 2, function(pool, ctx)
        local q = ctx.Queue()
        local function round()
          local vs = pool:starmap(function(qq, i)
            qq:put(i)
            return require("multiprocessing").Value("i", i)
          end, range(40, function(i) return { q, i } end), 4)
          assert.are.equal(40, vs[40].value)
          assert.are.equal(40, #drain(q, 40))
          vs = nil                          -- luacheck: ignore
          collectgarbage(); collectgarbage()
        end
        round()
        local n1 = H.fd_count()
        for _ = 1, 5 do round() end
        assert.is_true(H.fd_count() <= n1, ("%d fds, then %d"):format(n1, H.fd_count()))
        q:close()
      end)
    end)

    it("leaves no fd when a worker is killed with handles queued for it and in flight", function()
      with_pool(m, 1, function(pool, ctx)
        local q, ev = ctx.Queue(), ctx.Event()
        local pid = pool:apply(function() return require("multiprocessing.core").getpid() end)
        local stuck = pool:apply_async(function(e, qq) qq:put("started"); e:wait(30) end, { ev, q })
        local rest = pool:map_async(function(t) t.q:put(t.i); return t.i end,
                                    range(30, function(i) return { q = q, i = i } end), 1)
        assert.are.equal("started", q:get(10))
        core.kill(pid, 9)
        local ok, err = pcall(stuck.get, stuck, 10)
        assert.is_false(ok)
        assert.are.equal("WorkerLostError", err.type)
        assert.are.same(range(30), { table.unpack(rest:get(20), 1, 30) })
        assert.are.equal(30, #drain(q, 30))
        q:close()
      end)
    end)

    it("leaves no fd when results with handles are discarded (a cancelled submit, "
       .. "an imap left half read, terminate)", function()
      with_pool(m, 1, function(pool, ctx)
        local ev, q = ctx.Event(), ctx.Queue()
        local first = pool:submit(function(e) return e:wait(10) end, ev)
        local cancelled = pool:submit(function(qq) qq:put("ran") end, q)
        assert.is_true(cancelled:cancel())
        ev:set()
        assert.is_true(first:get(10))
        local it = pool:imap(function(x)
          return require("multiprocessing").Value("i", x)
        end, range(50), 5)
        local _, v = it()
        assert.are.equal(1, v.value)
        assert.is_nil(q:get(0.05))          -- the cancelled task never ran
        q:close()
      end)
    end)
  end)
end

describe("Pool handles: limits", function()
  H.leakcheck()

  it("more than 64 distinct fds in one chunk fail its tasks with SerializationError; "
     .. "smaller chunks carry them", function()
    with_pool("fork", 2, function(pool)
      local ends = {}
      for i = 1, 70 do ends[i] = mp.Pipe() end
      local ok, err = pcall(pool.map, pool, function(c) return c.readable end, ends, 70)
      assert.is_false(ok)
      assert.are.equal("SerializationError", err.type)
      assert.truthy(err.message:find("more than 64 file descriptors", 1, true), err.message)
      local r = pool:map(function(c) return c.readable end, ends, 10)
      for i = 1, 70 do assert.is_true(r[i]) end
      for i = 1, 70 do ends[i]:close() end
    end)
  end)
end)

describe("Pool handles: transports without fds", function()
  H.leakcheck()

  it("a handle through TCP raises SerializationError", function()
    local l <close> = mp.Listener("127.0.0.1:0")
    local c <close> = mp.Client(l.address)
    local s <close> = l:accept(10)
    local q = mp.Queue()
    local ok, err = pcall(c.send, c, { args = { 1, q } })
    assert.is_false(ok)
    assert.are.equal("SerializationError", err.type)
    assert.truthy(err.message:find("TCP", 1, true), err.message)
    assert.is_true(c:send({ args = { 1 } }))    -- the connection is whole
    assert.are.same({ args = { 1 } }, s:recv())
    q:close()
    assert.is_not_nil(s)
  end)

  it("a handle in a cluster task raises SerializationError naming where it sits", function()
    if not os.execute("command -v redis-server >/dev/null 2>&1")
       or not pcall(require, "multiprocessing.redis") then
      pending("redis-server or multiprocessing.redis missing")
      return
    end
    local cluster = require "multiprocessing.cluster"
    local rs = H.start_redis()
    local ok, err = pcall(function()
      local pool <close> = cluster.Pool{ redis = rs.url, queue = "q", authkey = "k" }
      local q = mp.Queue()
      local ok1, e1 = pcall(pool.apply_async, pool, function(x) return x end, { 1, q })
      local ok2, e2 = pcall(pool.map_async, pool, function(t) return t end, { { q = q } }, 1)
      q:close()
      assert.is_false(ok1)
      assert.are.equal("SerializationError", e1.type)
      assert.truthy(e1.message:find("task.args[2]: cannot serialize Queue handle here", 1, true), e1.message)
      assert.is_false(ok2)
      assert.truthy(e2.message:find("task.args[1].q: cannot serialize Queue handle here", 1, true), e2.message)
    end)
    rs.stop()
    assert(ok, err)
  end)
end)
