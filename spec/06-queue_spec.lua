-- Queue, SimpleQueue, JoinableQueue: arguments, values, blocking and
-- timeouts, many producers and consumers, large items, killed processes.
local H = require "helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local spawn = H.start   -- a child running fn(...), exiting with what fn returns

-- Put big into the empty queue q and get it back (within 10 s): the ring
-- grows to hold it and gives its pages back once drained. Returns the
-- ring's base size.
local function big_through(q, big)
  local base = q:_stats().cap
  assert.is_true(q:put(big))
  assert.is_true(q:_stats().cap >= #big)
  local r = q:get(10)
  assert.are.equal(#big, #r)
  assert.is_true(r == big)
  assert.are.equal(base, q:_stats().cap)
  return base
end

describe("Queue arguments", function()
  it("rejects bad maxsize and extra arguments", function()
    assert.has_error(function() mp.Queue(-1) end)
    assert.has_error(function() mp.Queue(1.5) end)
    assert.has_error(function() mp.Queue("3") end)
    assert.has_error(function() mp.Queue(3, 4) end)
    assert.has_error(function() mp.JoinableQueue(-2) end)
    assert.has_error(function() mp.SimpleQueue(1) end)
    local q = mp.Queue(2.0)
    assert.is_true(q:put(1))
    q:close()
  end)

  it("refuses nil as an item and bad timeouts", function()
    local q <close> = mp.Queue()
    assert.has_error(function() q:put(nil) end)
    assert.has_error(function() q:put() end)
    assert.has_error(function() q:put(1, -1) end)
    assert.has_error(function() q:put(1, "soon") end)
    assert.has_error(function() q:get(-0.5) end)
    assert.has_error(function() q:get(1, 2) end)
    assert.has_error(function() q:put(1, 1, 1) end)
    assert.has_error(function() q:get_nowait(1) end)
    assert.are.equal(0, q:qsize())
  end)

  it("raises in put for a value that cannot be serialized, and keeps nothing", function()
    local q <close> = mp.Queue()
    assert.has_error(function() q:put(coroutine.create(print)) end)
    local ok, err = pcall(q.put, q, { 1, 2, io.stdout })
    assert.is_false(ok)
    assert.is_true(mp.SerializationError:is(err))
    assert.matches("item[3]", err.message, 1, true)
    assert.are.equal(0, q:qsize())
    assert.are.same({ nil, "empty" }, { q:get_nowait() })
  end)

  it("carries a queue put into a queue (its descriptor channel; was a " ..
     "SerializationError)", function()
    local q <close> = mp.Queue()
    local other <close> = mp.Queue()
    assert.is_true(q:put(other))
    assert.is_true(q:put({ inner = other }))
    local a <close> = q:get(1)
    local t = q:get(1)
    local b <close> = t.inner
    a:put("through a")
    assert.are.equal("through a", b:get(1))
    other:put("through other")
    assert.are.equal("through other", a:get(1))
    assert.is_true(q:empty())
  end)

  it("raises on a closed queue, and close is idempotent", function()
    local q = mp.Queue()
    q:close()
    q:close()
    assert.has_error(function() q:put(1) end, "Queue is closed")
    assert.has_error(function() q:get(0) end, "Queue is closed")
    assert.has_error(function() q:qsize() end)
    assert.has_error(function() q:fileno() end)
    assert.matches("closed", tostring(q))
  end)
end)

describe("Queue in one process", function()
  H.leakcheck()

  it("keeps every kind of value exact and in order", function()
    local q <close> = mp.Queue()
    local values = H.scalars(string.rep("y", 100000))
    for _, v in ipairs(values) do assert.is_true(q:put(v)) end
    assert.are.equal(#values, q:qsize())
    for _, v in ipairs(values) do H.exact(v, q:get(0)) end
    q:put(0 / 0)
    H.exact(0 / 0, q:get(0))
    assert.is_true(q:empty())
  end)

  it("carries tables through the codec", function()
    local q <close> = mp.Queue()
    q:put(H.cyclic())
    H.same_cyclic(q:get(0))
    local big = {}
    for i = 1, 50000 do big[i] = i end        -- an encoded item above 8 KiB
    q:put(big)
    local rb = q:get(0)
    assert.are.equal(50000, #rb)
    assert.are.equal(50000, rb[50000])
  end)

  it("says empty and full for calls that cannot wait, timeout for positive ones", function()
    local q <close> = mp.Queue(2)
    assert.are.same({ nil, "empty" }, { q:get_nowait() })
    assert.are.same({ nil, "empty" }, { q:get(0) })
    assert.are.same({ nil, "timeout" }, { q:get(0.02) })
    assert.is_true(q:put_nowait("a"))
    assert.is_true(q:put("b", 0))
    assert.is_true(q:full())
    assert.are.same({ nil, "full" }, { q:put_nowait("c") })
    assert.are.same({ nil, "full" }, { q:put("c", 0) })
    assert.are.same({ nil, "timeout" }, { q:put("c", 0.02) })
    assert.are.equal(2, q:qsize())
    assert.are.equal("a", q:get_nowait())
    assert.is_false(q:full())
    assert.are.equal("b", q:get(1))
    assert.is_true(q:empty())
  end)

  it("bounds the number of items, not their size", function()
    local q <close> = mp.Queue(3)
    local s = string.rep("z", 1 << 20)
    for _ = 1, 3 do assert.is_true(q:put(s, 0)) end
    assert.are.same({ nil, "full" }, { q:put("tiny", 0) })
    for _ = 1, 3 do assert.are.equal(s, q:get(0)) end
  end)

  it("never blocks an unbounded put and keeps order while the ring grows and wraps", function()
    local q <close> = mp.Queue()
    local base = q:_stats().cap
    local nextput, nextget = 1, 1
    -- interleave so that the ring wraps, then outgrows itself with
    -- wrapped records in it
    for round = 1, 6 do
      for _ = 1, 3000 * round do
        assert.is_true(q:put(string.rep("k", nextput % 97) .. nextput, 0))
        nextput = nextput + 1
      end
      for _ = 1, 2000 * round do
        local v = q:get(0)
        assert.are.equal(string.rep("k", nextget % 97) .. nextget, v)
        nextget = nextget + 1
      end
    end
    assert.is_true(q:_stats().cap > base)
    while nextget < nextput do
      assert.are.equal(string.rep("k", nextget % 97) .. nextget, q:get(0))
      nextget = nextget + 1
    end
    assert.are.same({ nil, "empty" }, { q:get(0) })
  end)

  it("passes a 64 MiB item and gives the memory back once drained", function()
    local q <close> = mp.Queue()
    big_through(q, string.rep("0123456789abcdef", 4 << 20))
  end)

  it("gets this process's own items back through its feeder", function()
    local q <close> = mp.Queue()
    local mib = string.rep("s", 1 << 20)
    for i = 1, 12 do assert.is_true(q:put(mib .. i, 0)) end
    for i = 1, 12 do assert.is_true(q:get(10) == mib .. i) end
    assert.are.same({ nil, "empty" }, { q:get(0) })
  end)

  it("writes a feeder's items when closed, by <close> and by __gc", function()
    local mib = string.rep("g", 1 << 20)
    local q <close> = mp.Queue()
    local s, fds = mp.dumps(q)
    local function through(how)
      local other = mp.loads(s, { fds = fds })      -- a second view of q
      for i = 1, 12 do other:put(mib .. i) end       -- most wait in its feeder
      assert.is_true(q:qsize() < 12)
      if how == "close" then
        other:close()
      elseif how == "<close>" then
        local _ <close> = other
      end
    end
    for _, how in ipairs{ "close", "<close>", "__gc" } do
      through(how)
      collectgarbage(); collectgarbage()
      assert.are.equal(12, q:qsize())
      for i = 1, 12 do assert.is_true(q:get(0) == mib .. i) end
    end
  end)

  it("lets the collector run while large strings are taken (regression: unbounded heap)", function()
    local q <close> = mp.Queue()
    local s = string.rep("r", 1 << 20)
    collectgarbage()
    local base, peak = collectgarbage("count"), 0
    for _ = 1, 600 do
      q:put(s)
      assert(q:get(1))
      peak = math.max(peak, collectgarbage("count"))
    end
    -- 600 MiB went through; without collections the heap would hold it all
    assert.is_true(peak < base + 300 * 1024, ("peak %.0f KiB, base %.0f KiB"):format(peak, base))
  end)

  it("names itself and its state", function()
    local q <close> = mp.Queue(5)
    q:put(1)
    assert.are.equal("<Queue(qsize=1, maxsize=5)>", tostring(q))
    local u <close> = mp.Queue()
    assert.are.equal("<Queue(qsize=0)>", tostring(u))
    local j <close> = mp.JoinableQueue()
    assert.matches("^<JoinableQueue", tostring(j))
    local s <close> = mp.SimpleQueue()
    assert.matches("^<SimpleQueue", tostring(s))
  end)

  it("has join_thread (after close) and cancel_join_thread", function()
    local q = mp.Queue()
    q:put(1)
    q:cancel_join_thread()
    assert.has_error(function() q:join_thread() end)
    q:close()
    q:join_thread()
    q:cancel_join_thread()
  end)

  it("closes on <close> when a block errors, and by __gc", function()
    -- fd_count: one look may also see an end of the pipe popen makes to list them
    local fds0 = H.fd_count()
    local ok = pcall(function()
      local q <close> = mp.Queue()
      q:put(1)
      error("boom")
    end)
    assert.is_false(ok)
    assert.are.equal(fds0, H.fd_count())
    local function make() local q = mp.Queue(); q:put("x"); q:fileno() end
    make()
    collectgarbage(); collectgarbage()
    assert.are.equal(fds0, H.fd_count())
  end)

  it("is a handle for the codec", function()
    local q <close> = mp.Queue()
    local mt = getmetatable(q)
    local kind, state, fd, efd = mt.__mp_reduce(q)
    assert.are.equal("Queue", kind)
    assert.are.same({ "Queue" }, state)
    assert.are.equal("number", math.type(fd) and "number")
    assert.are.equal(q:fileno(), efd)
  end)

  it("rebuilds from its handle as the same queue (what spawn does)", function()
    local q <close> = mp.JoinableQueue(4)
    local s, fds = mp.dumps(q)
    local q2 <close> = mp.loads(s, { fds = fds })
    assert.are.equal("multiprocessing.JoinableQueue", getmetatable(q2).__name)
    q:put("one")
    assert.are.equal(1, q2:qsize())
    assert.are.equal("one", q2:get(1))
    q2:task_done()
    assert.is_true(q:join(0))
    for i = 1, 4 do q2:put(i) end
    assert.is_true(q:full())
    q2:close()
    assert.are.equal(1, q:get(1))
  end)
end)

describe("SimpleQueue and JoinableQueue in one process", function()
  it("SimpleQueue has put, get, empty, close", function()
    local q = mp.SimpleQueue()
    assert.is_nil(q.qsize)
    assert.is_nil(q.put_nowait)
    assert.is_true(q:empty())
    q:put({ a = 1 })
    assert.is_false(q:empty())
    assert.are.same({ a = 1 }, q:get(1))
    assert.are.same({ nil, "timeout" }, { q:get(0.01) })
    q:close()
    assert.has_error(function() q:put(1) end)
  end)

  it("JoinableQueue counts unfinished tasks and raises on too many task_done", function()
    local q <close> = mp.JoinableQueue()
    assert.are.same({ true }, { q:join(0) })
    q:put("a"); q:put("b")
    assert.are.same({ nil, "timeout" }, { q:join(0) })
    assert.are.same({ nil, "timeout" }, { q:join(0.02) })
    q:get(0); q:task_done()
    assert.are.same({ nil, "timeout" }, { q:join(0) })
    q:get(0); q:task_done()
    assert.is_true(q:join(1))
    assert.has_error(function() q:task_done() end, "task_done() called too many times")
    assert.is_nil(mp.Queue().task_done)
  end)

  it("JoinableQueue counts items that wait in the feeder", function()
    local q <close> = mp.JoinableQueue()
    local mib = string.rep("j", 1 << 20)
    for _ = 1, 12 do q:put(mib) end
    assert.are.equal(12, q:_stats().unfinished)
    for _ = 1, 12 do
      assert.are.same({ nil, "timeout" }, { q:join(0) })
      assert.is_true(q:get(10) == mib)
      q:task_done()
    end
    assert.is_true(q:join(0))
  end)
end)

describe("Queue across processes", function()
  H.leakcheck()

  it("carries items from a writer process to this one, in order", function()
    local q <close> = mp.Queue()
    local p = spawn(function(qq) for i = 1, 1000 do qq:put(i) end end, q)
    for i = 1, 1000 do assert.are.equal(i, q:get(10)) end
    assert.are.equal(0, p:join(10))
  end)

  it("delivers everything a producer put just before it exited", function()
    local q <close> = mp.Queue()
    local big = string.rep("b", 1 << 20)
    local p = spawn(function(qq)
      for i = 1, 500 do qq:put(i) end
      qq:put(big)
      qq:put({ last = true })
    end, q)
    assert.are.equal(0, p:join(10))
    for i = 1, 500 do assert.are.equal(i, q:get(0)) end
    assert.are.equal(big, q:get(0))
    assert.are.same({ last = true }, q:get(0))
  end)

  it("4 producers x 20,000 items reach 4 consumers exactly once, in per-producer order", function()
    local N, P, C = 20000, 4, 4
    local q <close> = mp.Queue(1000)
    local results <close> = mp.Queue()
    local producers, consumers = {}, {}
    for c = 1, C do
      consumers[c] = spawn(function(qq, rq)
        local count, sum, last, inorder = 0, 0, {}, true
        while true do
          local v = qq:get(30)
          if v == nil or v < 0 then break end
          local pid, seq = v // 1000000, v % 1000000
          if last[pid] and seq <= last[pid] then inorder = false end
          last[pid] = seq
          count, sum = count + 1, sum + v
        end
        rq:put({ count = count, sum = sum, inorder = inorder })
      end, q, results)
    end
    for pi = 1, P do
      producers[pi] = spawn(function(qq, id)
        for i = 1, N do assert(qq:put(id * 1000000 + i, 30)) end
      end, q, pi)
    end
    for pi = 1, P do assert.are.equal(0, producers[pi]:join(60)) end
    for _ = 1, C do assert.is_true(q:put(-1, 30)) end
    local count, sum = 0, 0
    for _ = 1, C do
      local r = results:get(60)
      assert.is_table(r)
      assert.is_true(r.inorder)
      count, sum = count + r.count, sum + r.sum
    end
    for c = 1, C do assert.are.equal(0, consumers[c]:join(30)) end
    local want = 0
    for pi = 1, P do want = want + N * pi * 1000000 + N * (N + 1) // 2 end
    assert.are.equal(P * N, count)
    assert.are.equal(want, sum)
    assert.is_true(q:empty())
  end)

  it("blocks a put on a full queue until a consumer makes room", function()
    local q <close> = mp.Queue(1)
    local go <close> = mp.Queue()
    q:put("first")
    local p = spawn(function(qq, g)
      g:get(10)
      qq:get(10)
      qq:get(10)
    end, q, go)
    assert.are.same({ nil, "full" }, { q:put("second", 0) })
    go:put(true)
    assert.is_true(q:put("second", 10))       -- waited for the child's get
    assert.are.equal(0, p:join(10))
    assert.is_true(q:empty())
  end)

  it("blocks a get on an empty queue until a producer puts", function()
    local q <close> = mp.Queue()
    local go <close> = mp.Queue()
    local p = spawn(function(qq, g) g:get(10); qq:put("late") end, q, go)
    assert.are.same({ nil, "timeout" }, { q:get(0.05) })
    go:put(true)
    assert.are.equal("late", q:get(10))
    assert.are.equal(0, p:join(10))
  end)

  it("passes a 64 MiB item to another process", function()
    local q <close> = mp.Queue()
    local back <close> = mp.Queue()
    local p = spawn(function(qq, b)
      local s = qq:get(30)
      b:put(#s)
      b:put(s:sub(1, 16) .. s:sub(-16))
      b:put(s == string.rep("0123456789abcdef", 4 << 20))
    end, q, back)
    q:put(string.rep("0123456789abcdef", 4 << 20))
    assert.are.equal(64 << 20, back:get(30))
    assert.are.equal("0123456789abcdef0123456789abcdef", back:get(30))
    assert.is_true(back:get(30))
    assert.are.equal(0, p:join(30))
  end)

  it("loses nothing when a consumer is killed while blocked in get", function()
    local q <close> = mp.Queue()
    local p = spawn(function(qq) qq:get(30) end, q)
    assert.is_truthy(H.wait_until(function() return q:_stats().get_waiters > 0 end, 10))
    p:kill()
    assert.are.equal(-9, p:join(10))
    assert.is_true(q:put("kept", 1))
    assert.are.equal("kept", q:get(1))
    q:put(1); q:put(2)
    assert.are.equal(2, q:qsize())
    assert.are.equal(1, q:get(1))
    assert.are.equal(2, q:get(1))
    -- its announcement as a sleeper is found stale and cleared
    for i = 1, 200 do q:put(i) end
    assert.are.equal(0, q:_stats().get_waiters)
  end)

  it("recovers the lock from a process killed while holding it", function()
    local q <close> = mp.Queue()
    local ready <close> = mp.Queue()
    q:put("before")
    local hold <close> = mp.Queue()
    local p = spawn(function(qq, r, h)
      core._test.queue_lock(qq)
      r:put(true)
      h:get(30)                                 -- sleeps holding qq's lock
    end, q, ready, hold)
    assert.is_true(ready:get(10))
    assert.are_not.equal(0, q:_stats().lock)
    p:kill()
    assert.are.equal(-9, p:join(10))
    assert.is_true(q:put("after", 10))
    assert.are.equal("before", q:get(10))
    assert.are.equal("after", q:get(10))
  end)

  it("takes the lock over when its owner's pid now names another process", function()
    local q <close> = mp.Queue()
    core._test.queue_lock(q, "reused")        -- our pid, another start time
    local p = spawn(function(qq) return qq:put("x", 10) and 0 or 3 end, q)
    assert.are.equal(0, p:join(10))
    assert.are.equal("x", q:get(10))
  end)

  it("never takes the lock from a live owner", function()
    local q <close> = mp.Queue()
    core._test.queue_lock(q)                  -- held by this live process
    local p = spawn(function(qq) qq:put("x", 10) end, q)
    assert.is_nil(p:join(0.5))               -- still waiting for the lock
    p:kill()
    assert.are.equal(-9, p:join(10))
  end)

  it("never shows a half-written item of a producer killed mid-put", function()
    local q <close> = mp.Queue()
    q:put(1)
    -- die after copying, before commit
    H.crash_at(1, function(qq) qq:put(string.rep("h", 1 << 20)) end, q)
    assert.is_true(q:put(2, 10))
    assert.are.equal(2, q:qsize())
    assert.are.equal(1, q:get(10))
    assert.are.equal(2, q:get(10))
    assert.is_true(q:empty())
  end)

  it("completes the put of a producer killed after its journal was written", function()
    local q <close> = mp.Queue()
    H.crash_at(2, function(qq) qq:put("journaled") end, q)   -- die inside the commit
    assert.is_true(q:put("next", 10))
    assert.are.equal("journaled", q:get(10))
    assert.are.equal("next", q:get(10))
  end)

  it("stays usable when producers of large items are killed at random moments", function()
    local q <close> = mp.Queue()
    local big = string.rep("L", 4 << 20)
    for round = 1, 4 do
      local p = spawn(function(qq, s)
        while true do qq:put(s); qq:get(10) end
      end, q, big)
      H.wait_until(function() return q:qsize() > 0 end, 5)
      os.execute("sleep 0.0" .. round)
      p:kill()
      assert.are.equal(-9, p:join(10))
      -- whatever was committed is whole; nothing half-written shows
      while true do
        local v = q:get(0)
        if v == nil then break end
        assert.is_true(v == big)
      end
      assert.is_true(q:put(round, 10))
      assert.are.equal(round, q:get(10))
    end
  end)

  it("keeps a producer's order across items that wait in its feeder", function()
    local q <close> = mp.Queue()
    local mib = string.rep("m", 1 << 20)
    local p = spawn(function(qq, m)
      for i = 1, 300 do
        if i % 10 == 0 then qq:put(m .. i) else qq:put(i) end
      end
    end, q, mib)
    for i = 1, 300 do
      local v = q:get(10)
      if i % 10 == 0 then assert.is_true(v == mib .. i) else assert.are.equal(i, v) end
    end
    assert.are.equal(0, p:join(10))
    assert.is_true(q:empty())
  end)

  it("moves items from its feeder while this process waits for something else", function()
    local q <close> = mp.Queue()
    local mib = string.rep("w", 1 << 20)
    local p = spawn(function(qq, m)
      for _ = 1, 40 do assert(qq:get(20) == m) end
    end, q, mib)
    for _ = 1, 40 do assert.is_true(q:put(mib, 0)) end  -- more than the ring takes
    assert.are.equal(0, p:join(30))                      -- the feeder fed it meanwhile
  end)

  it("delivers a feeder's items when the producer exits at once", function()
    local q <close> = mp.Queue()
    local mib = string.rep("e", 1 << 20)
    local p = spawn(function(qq, m)
      for i = 1, 20 do qq:put(m .. i) end
    end, q, mib)
    assert.are.equal(0, p:join(30))
    for i = 1, 20 do assert.is_true(q:get(0) == mib .. i) end
    assert.are.same({ nil, "empty" }, { q:get(0) })
  end)

  it("drops a feeder's items at exit after cancel_join_thread", function()
    local q <close> = mp.Queue()
    local mib = string.rep("c", 1 << 20)
    local p = spawn(function(qq, m)
      for i = 1, 20 do qq:put(m .. i) end
      qq:cancel_join_thread()
    end, q, mib)
    assert.are.equal(0, p:join(30))
    local n = 0
    while q:get(0) do n = n + 1 end
    assert.is_true(n >= 1 and n < 20)
  end)

  it("is waitable: mp.wait returns it when a get would not block", function()
    local q <close> = mp.Queue()
    local go <close> = mp.Queue()
    assert.are.same({}, mp.wait({ q }, 0.02))
    local p = spawn(function(qq, g) g:get(10); qq:put("ping") end, q, go)
    go:put(true)
    local ready = mp.wait({ q }, 10)
    assert.are.equal(q, ready[1])
    assert.is_true(q:_ready())
    assert.are.equal("ping", q:get(0))
    assert.is_false(q:_ready())
    assert.are.same({}, mp.wait({ q }, 0.02))
    assert.are.equal(0, p:join(10))
  end)

  it("JoinableQueue: join returns once 4 workers called task_done for every item", function()
    local q <close> = mp.JoinableQueue()
    local done <close> = mp.Queue()
    local workers = {}
    for w = 1, 4 do
      workers[w] = spawn(function(qq, d)
        while true do
          local v = qq:get(30)
          if v == nil or v == "stop" then qq:task_done(); break end
          d:put(v * v)
          qq:task_done()
        end
      end, q, done)
    end
    for i = 1, 200 do q:put(i) end
    assert.is_true(q:join(30))
    local sum = 0
    for _ = 1, 200 do sum = sum + done:get(10) end
    assert.are.equal(200 * 201 * 401 // 6, sum)
    for _ = 1, 4 do q:put("stop") end
    assert.is_true(q:join(30))
    for w = 1, 4 do assert.are.equal(0, workers[w]:join(10)) end
  end)

  it("SimpleQueue works between processes", function()
    local q <close> = mp.SimpleQueue()
    local p = spawn(function(qq) for i = 1, 100 do qq:put({ i = i }) end end, q)
    for i = 1, 100 do assert.are.equal(i, q:get(10).i) end
    assert.are.equal(0, p:join(10))
  end)
end)

describe("a timeout too long for a timespec", function()
  H.leakcheck()

  -- regression: get(1e300) turned into an absolute time that overflowed
  -- the futex's timespec, so the wait failed at once and spun the CPU
  it("sleeps like no timeout (Queue get, Lock acquire, Pipe poll)", function()
    local q <close> = mp.Queue()
    local lock <close> = mp.Lock()
    lock:acquire()
    local p = mp.Process{ target = function()
      if q:get(1e300) ~= "go" then os.exit(3) end
      if not lock:acquire(1e300) then os.exit(4) end
      os.exit(0)
    end }
    p:start()
    local function state()
      local f = io.open("/proc/" .. p.pid .. "/stat")
      local s = f and f:read("a") or ""
      if f then f:close() end
      return s:match("^%d+ %(.-%) (%S)")
    end
    -- a waiting child sleeps (S); a spinning one runs (R). On a loaded
    -- machine a sleeper that just woke may show R for a moment, so most
    -- looks, not all, must find it asleep
    local function asleep()
      assert.truthy(H.wait_until(function() return state() == "S" end, 10))
      local n = 0
      for _ = 1, 7 do
        H.sleep(0.02)
        if state() == "S" then n = n + 1 end
      end
      return n >= 4
    end
    -- the lock is released whatever a check finds, so that the child ends
    local ok, err = pcall(function()
      assert.is_true(asleep())             -- asleep in get
      q:put("go")
      assert.is_true(asleep())             -- now asleep on the lock
    end)
    lock:release()
    local code = H.finish(p, 30)           -- killed if it did not end
    if not ok then error(err, 0) end
    assert.are.equal(0, code)
    local a, b = mp.Pipe()
    local c = mp.Process{ target = function() H.sleep(0.1); b:send(1) end }
    c:start()
    assert.is_true(a:poll(1e300))           -- waits for the message
    assert.are.equal(1, a:recv(10))
    assert.are.equal(0, c:join(30))
    a:close(); b:close()
  end)
end)

describe("Queue under every start method", function()
  H.leakcheck()

  for _, method in ipairs{ "fork", "spawn", "forkserver" } do
    it("carries items and a feeder's items at exit (" .. method .. ")", function()
      local src = ("package.path = %q\npackage.cpath = %q\n"):format(package.path, package.cpath)
        .. ("local mp = require 'multiprocessing'\nmp.set_start_method(%q)\n"):format(method)
        .. [[
        local function child(q, jq)
          for i = 1, 100 do q:put(i) end
          local mib = string.rep("z", 1 << 20)
          for i = 1, 12 do q:put(mib .. i) end       -- beyond the ring: the feeder
          jq:put("task")
        end
        if mp.is_main() then
          local q, jq = mp.Queue(), mp.JoinableQueue()
          local p = mp.Process{ target = child, args = { q, jq } }
          p:start()
          print("join=" .. tostring(p:join(20)))
          local sum, big = 0, 0
          for _ = 1, 100 do sum = sum + q:get(5) end
          local mib = string.rep("z", 1 << 20)
          for i = 1, 12 do if q:get(5) == mib .. i then big = big + 1 end end
          print("sum=" .. sum, "big=" .. big, "task=" .. jq:get(5))
          jq:task_done()
          print("joined=" .. tostring(jq:join(1)))
        end
      ]]
      local out, code = H.run_lua(src, 60)
      assert.are.equal(0, code, out)
      assert.truthy(out:find("join=0", 1, true), out)
      assert.truthy(out:find("sum=5050", 1, true), out)
      assert.truthy(out:find("big=12", 1, true), out)
      assert.truthy(out:find("task=task", 1, true), out)
      assert.truthy(out:find("joined=true", 1, true), out)
    end)
  end
end)

describe("Queue's shared memory", function()
  H.leakcheck()

  -- The segment's memfd (a queue's handle carries it, then its eventfd).
  local function memfd(q)
    local _, fds = mp.dumps(q)
    return fds[1]
  end

  -- Write u64 values into the segment through the file, as any process
  -- holding it can. The header's layout (csrc/queue.h, qshm): the
  -- committed state begins at byte 24 with cap, head, tail, wrap and
  -- nitems; the ring (records of a u64 length, then a codec message) at
  -- 4096.
  local CAP, HEAD, TAIL, WRAP, NITEMS, RING = 24, 32, 40, 48, 56, 4096
  local function poke(q, t)
    local f = assert(io.open("/proc/self/fd/" .. memfd(q), "r+b"))
    for off, v in pairs(t) do
      f:seek("set", off)
      f:write(string.pack("<I8", v))
    end
    f:close()
  end

  it("holds each item as the codec's message, booleans, numbers and strings too", function()
    local vals = { 0, 127, 128, -1, -129, math.maxinteger, math.mininteger, 1.5, -0.0,
                   1 / 0, 0 / 0, 2^53, true, false, "", "short", string.rep("s", 31),
                   string.rep("l", 32), string.rep("x", 20000), { 1, "two", k = false } }
    for _, v in ipairs(vals) do
      local q <close> = mp.Queue()
      assert.is_true(q:put(v))
      local f = assert(io.open("/proc/self/fd/" .. memfd(q), "rb"))
      f:seek("set", RING)
      local len = string.unpack("<I8", f:read(8))
      local payload = f:read(len)
      f:close()
      assert.are.equal(mp.dumps(v), payload)
      assert.are.equal(mp.dumps(v), mp.dumps(q:get(0)))    -- exact: -0.0, nan, integer or float
    end
  end)

  it("cannot be truncated by a process that holds it (regression: SIGBUS in the " ..
     "next get)", function()
    local q <close> = mp.Queue()
    q:put("kept")
    local p = H.start(function()
      local f = io.open("/proc/self/fd/" .. memfd(q), "w")   -- O_TRUNC
      if f then f:close() end
      local v = q:get(0)
      return f == nil and v == "kept" and 0 or 3
    end)
    assert.are.equal(0, H.finish(p, 10))
    q:put("still")
    assert.are.equal("still", q:get(0))
  end)

  it("grows again after a drain gave its pages back (the segment cannot shrink)", function()
    local q <close> = mp.Queue()
    local base = big_through(q, string.rep("b", 32 << 20))
    local mid = string.rep("m", base)      -- more than the base ring: it grows
    assert.is_true(q:put(mid))
    assert.is_true(q:_stats().cap > base)
    assert.is_true(q:get(10) == mid)
  end)

  it("is refused as a received handle when not sealed against shrinking", function()
    local q <close> = mp.Queue()
    q:put("x")
    local s, fds = mp.dumps(q)
    -- a forged segment: the same bytes in a memfd that may still shrink
    local forged <close> = H.forge_unsealed(fds[1])
    local ok, err = pcall(mp.loads, s, { fds = { forged:fileno(), fds[2], fds[3], fds[4] } })
    assert.is_false(ok)
    assert.is_true(mp.SerializationError:is(err))
    assert.truthy(err.message:find("not sealed against shrinking", 1, true), err.message)
    assert.are.equal("x", q:get(0))
  end)

  -- Corrupt the state of a queue in a child, then call op there: it must
  -- raise ProcessError saying the shared state is corrupt, twice (so the
  -- lock was let go), rather than read or write out of the ring (before,
  -- the child died of SIGSEGV or SIGBUS).
  local function corrupt_then(state, op, maxsize)
    return H.finish(H.start(function()
      local q <close> = mp.Queue(maxsize)
      q:put("x")
      poke(q, state)
      for _ = 1, 2 do
        local ok, err = pcall(op, q)
        if ok or not mp.ProcessError:is(err) or
           not err.message:find("shared state is corrupt", 1, true) then
          io.stderr:write(tostring(err), "\n")
          return 3
        end
      end
      return 0
    end), 10)
  end

  it("raises in get when the head is beyond the ring (regression: SIGSEGV)", function()
    assert.are.equal(0, corrupt_then({ [HEAD] = 1 << 40 }, function(q) return q:get(0) end))
  end)

  it("raises in get when the capacity is beyond the segment (regression: SIGBUS)", function()
    assert.are.equal(0, corrupt_then({ [CAP] = 1 << 30, [HEAD] = 1 << 29,
                                       [TAIL] = (1 << 29) + 64 },
                                     function(q) return q:get(0) end))
  end)

  it("raises in put when the wrapped run points beyond the ring (regression: SIGSEGV)", function()
    -- bounded, so that put writes itself rather than through its feeder
    assert.are.equal(0, corrupt_then({ [WRAP] = 1 << 40, [HEAD] = 1 << 40, [TAIL] = 1 << 39,
                                       [NITEMS] = 3 },
                                     function(q) return q:put("y") end, 10))
  end)

  it("lets a producer whose feeder holds items exit when the state is corrupt " ..
     "(regression: SIGSEGV in the exit's flush)", function()
    assert.are.equal(0, H.finish(H.start(function()
      local q = mp.Queue()
      q:put("x")
      -- more than 4 MiB queued by the state's account: the next put waits
      -- in the feeder, which the exit path then writes at once
      poke(q, { [WRAP] = 1 << 40, [HEAD] = 1 << 40, [TAIL] = 1 << 39, [NITEMS] = 3 })
      q:put("y")
      return 0
    end), 10))
  end)

  it("raises in get when a record's length is beyond the ring", function()
    assert.are.equal(0, corrupt_then({ [RING] = 1 << 50 }, function(q) return q:get(0) end))
  end)
end)

-- Ctrl-C (see H.interrupt_wait): a queue's wait gives way to it at once,
-- announced as no waiter and holding nothing, so the queue goes on as
-- before.
describe("SIGINT interrupts a blocked wait", function()
  H.leakcheck()
  local interrupt = H.interrupt_wait

  it("in Queue:get() of an empty queue", function()
    local q <close> = mp.Queue()
    local code = interrupt(function(ready) ready() q:get() end)
    assert.are.equal(1, code)
    assert.are.equal(0, q:_stats().get_waiters)
    assert.is_true(q:put("after"))
    assert.are.equal("after", q:get(5))
  end)

  it("in Queue:put() on a full bounded queue", function()
    local q <close> = mp.Queue(1)
    assert.is_true(q:put("first"))
    local code = interrupt(function(ready) ready() q:put("second") end)
    assert.are.equal(1, code)
    assert.are.equal(0, q:_stats().put_waiters)
    assert.are.equal(1, q:qsize())
    assert.are.equal("first", q:get(5))
    assert.are.equal("empty", select(2, q:get_nowait()))
  end)

  it("in JoinableQueue:join()", function()
    local q <close> = mp.JoinableQueue()
    q:put(1)
    local code = interrupt(function(ready) ready() q:join() end)
    assert.are.equal(1, code)
    assert.are.equal(1, q:get(5))
    q:task_done()
    assert.is_true(q:join(5))
  end)

  it("while the process runs a queue's feeder thread (which blocks signals)", function()
    -- items beyond 4 MiB with no consumer wait in the feeder thread; a
    -- SIGINT handled by that thread would leave the main thread's wait
    -- without EINTR (the thread blocks every signal; Linux also offers a
    -- process's signal to its main thread first)
    local q <close> = mp.Queue()
    local e <close> = mp.Event()
    local code = interrupt(function(ready)
      local item = string.rep("x", 1 << 20)
      for _ = 1, 8 do q:put(item) end
      local f = io.popen("ls /proc/" .. core.getpid() .. "/task | wc -l")
      local threads = tonumber(f:read("a"))
      f:close()
      if threads < 2 then os.exit(6) end
      ready()
      e:wait(60)
    end)
    assert.are.equal(1, code)
    -- the exit path wrote what waited in the feeder
    local n = 0
    while q:get(5) do
      n = n + 1
      if n == 8 then break end
    end
    assert.are.equal(8, n)
  end)

  it("and a get whose signal's handler raises nothing resumes and returns its item", function()
    local q <close> = mp.Queue()
    local go <close> = mp.Event()
    local p = spawn(function()
      -- signals come: still times out, on time
      local v, why = H.nop_timed_wait(go, function(t) return q:get(t) end)
      if v ~= nil or why ~= "timeout" then os.exit(3) end
      v = q:get(30)                        -- put after more signals
      local _, n = core._test.nop_signal()
      os.exit(v == 42 and n >= 5 and 0 or 4)
    end)
    H.nop_signals(p, go)
    q:put(42)
    assert.are.equal(0, H.finish(p))
  end)
end)
