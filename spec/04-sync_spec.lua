-- Lock, RLock, Semaphore, BoundedSemaphore, Condition, Event, Barrier:
-- arguments, behaviour within one process and across processes, timeouts,
-- recovery of a lock whose holder died, lifecycle.
local H = require "helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local spawn, join = H.start, H.finish   -- a child running fn(...); join, kill, close

-- A child that takes lock l, says so, then runs rest(); returned once it
-- holds the lock.
local function holder(l, rest)
  local held <close> = mp.Event()
  local p = spawn(function() l:acquire() held:set() rest() end)
  assert.is_true(held:wait(10))
  return p
end

describe("Lock", function()
  H.leakcheck()

  it("rejects bad arguments", function()
    local l = mp.Lock()
    assert.has_error(function() mp.Lock(1) end)
    assert.has_error(function() l:acquire(-1) end)
    assert.has_error(function() l:acquire("soon") end)
    assert.has_error(function() l.acquire({}) end)
    assert.has_error(function() l.acquire(mp.Event()) end)
    assert.has_error(function() l:with(5) end)
    l:close()
  end)

  it("acquires, refuses a second acquire, and releases", function()
    local l <close> = mp.Lock()
    H.lock_once(l)
    assert.is_true(l:acquire(0))
    l:release()
  end)

  it("raises when releasing an unheld lock", function()
    local l <close> = mp.Lock()
    assert.has_error(function() l:release() end, "release unlocked lock")
  end)

  it("runs a function under with() and releases it even on error", function()
    local l <close> = mp.Lock()
    local a, b = l:with(function(x, y)
      assert.is_true(l:locked())
      return x + y, "ok"
    end, 1, 2)
    assert.are.equal(3, a)
    assert.are.equal("ok", b)
    assert.is_false(l:locked())
    assert.has_error(function() l:with(function() error("boom") end) end)
    assert.is_false(l:locked())
  end)

  it("names itself and its state", function()
    local l = mp.Lock()
    assert.are.equal("<Lock(unlocked)>", tostring(l))
    l:acquire()
    assert.truthy(tostring(l):match("^<Lock%(locked by %d+%)>$"))
    l:release()
    l:close()
    assert.are.equal("<Lock(closed)>", tostring(l))
  end)

  it("closes twice and raises when used after close", function()
    local l = mp.Lock()
    l:close()
    l:close()
    assert.has_error(function() l:acquire() end, "Lock is closed")
    assert.has_error(function() l:release() end, "Lock is closed")
    assert.has_error(function() l:locked() end, "Lock is closed")
  end)

  it("excludes another process, which waits for the release", function()
    local l <close> = mp.Lock()
    local go <close> = mp.Event()
    local p = holder(l, function() go:wait(10) l:release() end)
    assert.is_false(l:acquire(0))
    assert.is_false(l:acquire(0.05))
    go:set()
    assert.is_true(l:acquire(10))
    l:release()
    assert.are.equal(0, join(p))
  end)

  it("goes to a waiter that slept past its naps when the holder releases", function()
    local l <close> = mp.Lock()
    -- held longer than a waiter's naps: the waiter sleeps until woken
    local p = holder(l, function() mp.Event():wait(0.2) l:release() end)
    assert.is_true(l:acquire(10))
    l:release()
    assert.are.equal(0, join(p))
  end)

  it("is not starved by a process taking it again in a tight loop", function()
    local l <close> = mp.Lock()
    local running <close> = mp.Event()
    local stop <close> = mp.Event()
    local p = spawn(function()
      local acq, rel, is_set = l.acquire, l.release, stop.is_set
      running:set()
      while not is_set(stop) do
        for _ = 1, 100 do acq(l); rel(l) end
      end
    end)
    assert.is_true(running:wait(10))
    local got = 0
    for _ = 1, 20 do
      if l:acquire(10) then got = got + 1; l:release() end
    end
    stop:set()
    assert.are.equal(0, join(p))
    assert.are.equal(20, got)
  end)

  it("may be released by another process, as in Python", function()
    local l <close> = mp.Lock()
    l:acquire()
    local p = spawn(function() l:release() end)
    assert.are.equal(0, join(p))
    assert.is_false(l:locked())
  end)

  it("is recovered with 'abandoned' when its holder is killed", function()
    local l <close> = mp.Lock()
    local h = holder(l, function() mp.Event():wait(30) end)
    -- a second process already waiting when the holder dies
    local waiter = spawn(function()
      local ok, why = l:acquire(15)
      if ok and why == "abandoned" then l:release() return 7 end
      return 3
    end)
    h:kill()
    assert.are.equal(-9, join(h))
    assert.are.equal(7, join(waiter))
    assert.is_false(l:locked())
  end)

  it("is recovered at once by a try (timeout 0) after its holder exited", function()
    local l <close> = mp.Lock()
    local p = spawn(function() l:acquire() os.exit(0, false) end)
    assert.are.equal(0, join(p))
    assert.is_true(l:locked())
    local ok, why = l:acquire(0)
    assert.is_true(ok)
    assert.are.equal("abandoned", why)
    -- a normal acquire after that has no second value
    l:release()
    ok, why = l:acquire(0)
    assert.is_true(ok)
    assert.is_nil(why)
    l:release()
  end)

  it("is recovered when its dead holder's pid now names another process", function()
    local l <close> = mp.Lock()
    core._test.sync_reused(l)   -- our pid, another start time
    local p = spawn(function()
      local ok, why = l:acquire(10)
      return ok and why == "abandoned" and 0 or 3
    end)
    assert.are.equal(0, join(p))
  end)

  it("is never taken from a live holder", function()
    local l <close> = mp.Lock()
    l:acquire()
    local p = spawn(function() return l:acquire(0.3) and 3 or 0 end)
    assert.are.equal(0, join(p))
    l:release()
  end)

  it("is recovered even while its dead holder is an unreaped zombie", function()
    local l <close> = mp.Lock()
    local p = holder(l, function() mp.Event():wait(30) end)
    p:kill()
    -- not joined yet: the child is a zombie
    local ok, why = l:acquire(10)
    assert.is_true(ok)
    assert.are.equal("abandoned", why)
    l:release()
    assert.are.equal(-9, join(p))
  end)
end)

describe("RLock", function()
  H.leakcheck()

  it("is reentrant within its owner and counts levels", function()
    local r <close> = mp.RLock()
    assert.is_true(r:acquire())
    assert.is_true(r:acquire(0))
    assert.truthy(tostring(r):match("count=2"))
    r:release()
    assert.is_true(r:locked())
    r:release()
    assert.is_false(r:locked())
    assert.are.equal("<RLock(unlocked)>", tostring(r))
  end)

  it("raises when released unheld", function()
    local r <close> = mp.RLock()
    assert.has_error(function() r:release() end)
  end)

  it("raises when released by a process that does not own it", function()
    local r <close> = mp.RLock()
    r:acquire()
    local p = spawn(function()
      local ok = pcall(r.release, r)
      return ok and 1 or 5
    end)
    assert.are.equal(5, join(p))
    assert.is_true(r:locked())
    r:release()
  end)

  it("excludes other processes until fully released", function()
    local r <close> = mp.RLock()
    local tried <close> = mp.Event()
    r:acquire(); r:acquire()
    local p = spawn(function()
      if r:acquire(0) then return 1 end
      tried:set()
      local ok = r:acquire(10)
      return ok and 4 or 2
    end)
    assert.is_true(tried:wait(10))
    r:release()
    assert.is_true(r:_is_mine())
    r:release()
    assert.are.equal(4, join(p))
  end)

  it("is recovered at level 1 after its holder died holding several levels", function()
    local r <close> = mp.RLock()
    local p = spawn(function() r:acquire(); r:acquire(); r:acquire() end)
    assert.are.equal(0, join(p))
    local ok, why = r:acquire(5)
    assert.is_true(ok)
    assert.are.equal("abandoned", why)
    r:release()
    assert.is_false(r:locked())
  end)
end)

describe("Semaphore and BoundedSemaphore", function()
  H.leakcheck()

  it("rejects bad arguments", function()
    assert.has_error(function() mp.Semaphore(-1) end)
    assert.has_error(function() mp.Semaphore(1.5) end)
    assert.has_error(function() mp.Semaphore("2") end)
    assert.has_error(function() mp.BoundedSemaphore(-2) end)
    local s <close> = mp.Semaphore()
    assert.has_error(function() s:acquire(-0.5) end)
  end)

  it("counts acquires and releases", function()
    local s <close> = mp.Semaphore(2)
    assert.are.equal(2, s:get_value())
    assert.is_true(s:acquire())
    assert.is_true(s:acquire(0))
    assert.is_false(s:acquire(0))
    assert.is_false(s:acquire(0.05))
    assert.are.equal(0, s:get_value())
    s:release(); s:release(); s:release()       -- unbounded
    assert.are.equal(3, s:get_value())
    assert.are.equal("<Semaphore(value=3)>", tostring(s))
  end)

  it("defaults to 1 and accepts 0", function()
    local s <close> = mp.Semaphore()
    assert.are.equal(1, s:get_value())
    local z <close> = mp.Semaphore(0)
    assert.is_false(z:acquire(0))
  end)

  it("raises when a BoundedSemaphore is released past its value", function()
    local b <close> = mp.BoundedSemaphore(2)
    assert.has_error(function() b:release() end, "semaphore released too many times")
    b:acquire()
    b:release()
    assert.has_error(function() b:release() end)
    assert.are.equal(2, b:get_value())
  end)

  it("wakes a waiting process on release", function()
    local s <close> = mp.Semaphore(0)
    local p = spawn(function() return s:acquire(10) and 6 or 2 end)
    s:release()
    assert.are.equal(6, join(p))
    assert.are.equal(0, s:get_value())
  end)

  it("runs with() holding a slot", function()
    local s <close> = mp.Semaphore(1)
    assert.are.equal(0, s:with(function() return s:get_value() end))
    assert.are.equal(1, s:get_value())
  end)
end)

describe("Condition", function()
  H.leakcheck()

  it("rejects a bad lock and waits or notifies without the lock", function()
    assert.has_error(function() mp.Condition(5) end)
    assert.has_error(function() mp.Condition(mp.Semaphore()) end)
    local c <close> = mp.Condition()
    assert.has_error(function() c:wait(0) end, "cannot wait on un-acquired lock")
    assert.has_error(function() c:notify() end, "cannot notify on un-acquired lock")
    assert.has_error(function() c:notify_all() end)
    c:acquire()
    assert.has_error(function() c:notify(-1) end)
    assert.has_error(function() c:wait_for(5) end)
    assert.has_error(function() c:wait_for(function() end, -1) end)
    c:release()
  end)

  it("times out a wait and keeps the lock held afterwards", function()
    local c <close> = mp.Condition()
    c:acquire()
    assert.is_false(c:wait(0.05))
    assert.is_false(c:wait(0))
    assert.is_true(c:_lock():_is_mine())
    c:release()
  end)

  it("uses a given lock", function()
    local l <close> = mp.Lock()
    local c <close> = mp.Condition(l)
    assert.are.equal(l, c:_lock())
    c:acquire()
    assert.is_true(l:locked())
    c:release()
    assert.is_false(l:locked())
    assert.truthy(tostring(c):match("^<Condition%(<Lock%(unlocked%)>, waiters=0%)>$"))
  end)

  it("is woken by notify from another process", function()
    local c <close> = mp.Condition()
    local v <close> = mp.RawValue("int32", 0)
    c:acquire()
    local p = spawn(function()
      c:acquire()
      v.value = 1
      c:notify()
      c:release()
    end)
    assert.is_true(c:wait_for(function() return v.value == 1 end, 10))
    c:release()
    assert.are.equal(0, join(p))
  end)

  it("wait_for returns the predicate's last value on timeout", function()
    local c <close> = mp.Condition()
    c:acquire()
    local n = 0
    assert.is_false(c:wait_for(function() n = n + 1 return false end, 0.05))
    assert.truthy(n >= 2)
    assert.are.equal("yes", c:wait_for(function() return "yes" end, 0))
    c:release()
  end)

  it("releases an RLock fully while waiting and restores its level", function()
    local c <close> = mp.Condition(mp.RLock())
    local lk = c:_lock()
    local got <close> = mp.Event()
    c:acquire(); c:acquire()
    local p = spawn(function()
      if not lk:acquire(10) then return 2 end
      got:set()
      c:notify()
      lk:release()
    end)
    assert.is_true(c:wait(10))
    assert.is_true(got:is_set())
    assert.are.equal(2, lk:_count())
    c:release()
    assert.is_true(lk:_is_mine())
    c:release()
    assert.is_false(lk:locked())
    assert.are.equal(0, join(p))
  end)

  it("notify(n) wakes at most n waiters, notify_all wakes the rest", function()
    local c <close> = mp.Condition()
    local waiting <close> = mp.RawValue("int32", 0)
    local woken <close> = mp.RawValue("int32", 0)
    local ps = {}
    for i = 1, 3 do
      ps[i] = spawn(function()
        c:acquire()
        waiting.value = waiting.value + 1
        local ok = c:wait(15)
        woken.value = woken.value + 1
        c:release()
        return ok and 0 or 2
      end)
    end
    assert.is_true(H.wait_until(function()
      return c:with(function() return waiting.value == 3 end)
    end, 10))
    c:with(function() c:notify(1) end)
    assert.is_true(H.wait_until(function() return woken.value == 1 end, 10))
    os.execute("sleep 0.2")
    assert.are.equal(1, woken.value)
    c:with(function() c:notify_all() end)
    for i = 1, 3 do assert.are.equal(0, join(ps[i])) end
    assert.are.equal(3, woken.value)
  end)

  it("takes back a lock abandoned during the wait and says so", function()
    local c <close> = mp.Condition(mp.Lock())
    local held <close> = mp.Event()
    c:acquire()
    local p = spawn(function()
      c:acquire()          -- gets it while the parent waits
      held:set()
      os.exit(0, false)    -- dies holding it
    end)
    -- the child can only take the lock while this process waits, so the
    -- wait during which it did takes the lock back from the dead child
    local ok, why
    repeat ok, why = c:wait(0.05) until held:is_set()
    assert.are.equal(0, join(p))
    assert.is_false(ok)
    assert.are.equal("abandoned", why)
    assert.is_true(c:_lock():_is_mine())
    c:release()
  end)

  it("notify with nobody waiting is not remembered", function()
    local c <close> = mp.Condition()
    c:acquire()
    c:notify()
    c:notify_all()
    assert.is_false(c:wait(0.05))
    c:release()
  end)

  it("keeps a notification for its waiter when the notifier waits again at once", function()
    -- two processes take turns: each sets the turn to the other, notifies,
    -- releases, and waits for its turn again; a wait that times out means
    -- a notification went to the wrong process
    local c <close> = mp.Condition()
    local turn <close> = mp.RawValue("int32", 1)
    local function play(me, other)
      for _ = 1, 200 do
        c:acquire()
        while turn.value ~= me do
          if not c:wait(5) then c:release() return false end
        end
        turn.value = other
        c:notify()
        c:release()
      end
      return true
    end
    local p = spawn(function() return play(2, 1) and 0 or 3 end)
    local ok = play(1, 2)
    assert.are.equal(0, join(p))
    assert.is_true(ok)
  end)
end)

describe("Event", function()
  H.leakcheck()

  it("sets, clears and waits with a timeout", function()
    local e <close> = mp.Event()
    assert.has_error(function() mp.Event(1) end)
    assert.has_error(function() e:wait(-1) end)
    assert.is_false(e:is_set())
    assert.is_false(e:wait(0))
    assert.is_false(e:wait(0.05))
    assert.are.equal("<Event(unset)>", tostring(e))
    e:set()
    assert.is_true(e:is_set())
    assert.is_true(e:wait())
    assert.is_true(e:wait(0))
    assert.are.equal("<Event(set)>", tostring(e))
    e:clear()
    assert.is_false(e:is_set())
  end)

  it("takes a huge timeout as waiting until set", function()
    local e <close> = mp.Event()
    local p = spawn(function() e:set() end)
    assert.is_true(e:wait(1e300))
    assert.is_true(e:wait(math.huge))
    assert.are.equal(0, join(p))
  end)

  it("wakes every waiting process when set", function()
    local e <close> = mp.Event()
    local ps = {}
    for i = 1, 3 do ps[i] = spawn(function() return e:wait(15) and 0 or 2 end) end
    e:set()
    for i = 1, 3 do assert.are.equal(0, join(ps[i])) end
  end)
end)

describe("Barrier", function()
  H.leakcheck()

  -- A child that waits on b for 15 s and exits 4 if the wait breaks (2 for
  -- any other end); returned once it waits.
  local function waiter(b)
    local p = spawn(function()
      local idx, why = b:wait(15)
      return (idx == nil and why == "broken") and 4 or 2
    end)
    assert.is_true(H.wait_until(function() return b.n_waiting == 1 end, 10))
    return p
  end

  it("rejects bad arguments", function()
    assert.has_error(function() mp.Barrier() end)
    assert.has_error(function() mp.Barrier(0) end)
    assert.has_error(function() mp.Barrier("3") end)
    assert.has_error(function() mp.Barrier(2, 5) end)
    assert.has_error(function() mp.Barrier(2, nil, -1) end)
    local b <close> = mp.Barrier(1)
    assert.has_error(function() b:wait(-1) end)
  end)

  it("has parties, n_waiting, broken and a name", function()
    local b <close> = mp.Barrier(3)
    assert.are.equal(3, b.parties)
    assert.are.equal(0, b.n_waiting)
    assert.is_false(b.broken)
    assert.are.equal("<Barrier(parties=3, waiting=0)>", tostring(b))
  end)

  it("gives distinct indices 1..parties and runs the action once per pass", function()
    local n = 4
    local count <close> = mp.RawValue("int32", 0)
    local seen <close> = mp.RawArray("int32", n * 2)
    local b <close> = mp.Barrier(n, function() count.value = count.value + 1 end)
    local ps = {}
    for i = 1, n - 1 do
      ps[i] = spawn(function()
        for pass = 0, 1 do
          local idx = b:wait(15)
          if not idx then return 2 end
          seen[pass * n + idx] = seen[pass * n + idx] + 1
        end
      end)
    end
    for pass = 0, 1 do
      local idx = b:wait(15)
      assert.is_number(idx)
      seen[pass * n + idx] = seen[pass * n + idx] + 1
    end
    for i = 1, n - 1 do assert.are.equal(0, join(ps[i])) end
    assert.are.equal(2, count.value)
    for i = 1, n * 2 do assert.are.equal(1, seen[i]) end
  end)

  it("breaks for everyone when one party times out", function()
    local b <close> = mp.Barrier(3)
    local p = waiter(b)
    local idx, why = b:wait(0.1)
    assert.is_nil(idx)
    assert.are.equal("timeout", why)
    assert.are.equal(4, join(p))
    assert.is_true(b.broken)
    assert.are.same({ nil, "broken" }, { b:wait(0) })
  end)

  it("uses its default timeout", function()
    local b <close> = mp.Barrier(2, nil, 0.05)
    assert.are.same({ nil, "timeout" }, { b:wait() })
    assert.is_true(b.broken)
  end)

  it("abort() breaks it for waiters, reset() makes it usable again", function()
    local b <close> = mp.Barrier(2)
    local p = waiter(b)
    b:abort()
    assert.are.equal(4, join(p))
    assert.is_true(b.broken)
    assert.truthy(tostring(b):match("broken"))
    b:reset()
    assert.is_false(b.broken)
    p = spawn(function() return b:wait(15) and 0 or 2 end)
    assert.is_number(b:wait(15))
    assert.are.equal(0, join(p))
  end)

  it("reset() while a party waits breaks that wait only", function()
    local b <close> = mp.Barrier(2)
    local p = waiter(b)
    b:reset()
    assert.are.equal(4, join(p))
    assert.is_false(b.broken)
    assert.are.equal(0, b.n_waiting)
  end)

  it("breaks when the action raises, and the error reaches its caller", function()
    local b <close> = mp.Barrier(1, function() error("action failed") end)
    assert.has_error(function() b:wait(1) end, "action failed")
    assert.is_true(b.broken)
  end)
end)

describe("sync objects' lifecycle", function()
  H.leakcheck()

  local makers = {
    Lock = function() return mp.Lock(), "acquire" end,
    RLock = function() return mp.RLock(), "acquire" end,
    Semaphore = function() return mp.Semaphore(2), "get_value" end,
    BoundedSemaphore = function() return mp.BoundedSemaphore(2), "release" end,
    Condition = function() return mp.Condition(), "notify" end,
    Event = function() return mp.Event(), "is_set" end,
    Barrier = function() return mp.Barrier(2), "reset" end,
  }
  for kind, make in pairs(makers) do
    it(kind .. " closes twice, names itself closed and raises when used", function()
      local o, method = make()
      assert.truthy(tostring(o):match("^<" .. kind .. "%("))
      assert.is_number(o:fileno())
      o:close()
      o:close()
      assert.are.equal("<" .. kind .. "(closed)>", tostring(o))
      assert.has_error(function() o[method](o) end, kind .. " is closed")
    end)

    it(kind .. " is closed by <close> and by the collector", function()
      do local o <close> = make() end   -- luacheck: ignore 211
      make()               -- garbage at once: its __gc closes it
      collectgarbage(); collectgarbage()
      -- H.leakcheck checks that no fd is left
    end)
  end

  it("leaves nothing in /dev/shm", function()
    local function shm()
      local p = io.popen("ls -1 /dev/shm 2>/dev/null")
      local t = p:read("a")
      p:close()
      return t
    end
    local before = shm()
    local objs = {}
    for _, make in pairs(makers) do objs[#objs + 1] = make() end
    objs[#objs + 1] = mp.Value("int32", 1)
    objs[#objs + 1] = mp.Array("double", 100)
    assert.are.equal(before, shm())
    for _, o in ipairs(objs) do o:close() end
  end)

  it("refuses an object of another class", function()
    local e <close> = mp.Event()
    local l <close> = mp.Lock()
    assert.has_error(function() l.acquire(e) end, "bad argument #1 to 'acquire' (Lock expected, got multiprocessing.Event)")
    assert.has_error(function() e.set(l) end)
    assert.has_error(function() e.set(io.stdout) end)
    assert.has_error(function() e.set(nil) end)
  end)
end)

describe("sync objects as handles", function()
  H.leakcheck()

  it("travel through a Pipe and share state with the original", function()
    local a, c = mp.Pipe()
    local l <close> = mp.Lock()
    local e <close> = mp.Event()
    local s <close> = mp.Semaphore(3)
    local cond <close> = mp.Condition()
    local b <close> = mp.Barrier(2, nil, 5)
    a:send({ l, e, s, cond, b })
    local t = c:recv(5)
    t[1]:acquire()
    assert.is_true(l:locked())
    t[1]:release()
    e:set()
    assert.is_true(t[2]:is_set())
    t[3]:acquire()
    assert.are.equal(2, s:get_value())
    t[4]:acquire()
    assert.is_true(cond:_lock():locked())
    t[4]:release()
    assert.are.equal(2, t[5].parties)
    for _, o in ipairs(t) do o:close() end
    a:close(); c:close()
  end)
end)

-- Ctrl-C (see H.interrupt_wait): a wait in C gives way to it at once
-- (before, the wait went on until it ended by itself, so the child below
-- was still waiting when joined).
describe("SIGINT interrupts a blocked wait", function()
  H.leakcheck()
  local interrupt = H.interrupt_wait

  it("in Event:wait(30)", function()
    local e <close> = mp.Event()
    local code = interrupt(function(ready) ready() e:wait(30) end)
    assert.are.equal(1, code)
  end)

  it("in Event:wait() inside a coroutine (the hook is on the main thread)", function()
    local e <close> = mp.Event()
    local code = interrupt(function(ready)
      coroutine.wrap(function() ready() e:wait() end)()
    end)
    assert.are.equal(1, code)
  end)

  it("in Lock:acquire() of a lock the parent holds, which stays the parent's", function()
    local l <close> = mp.Lock()
    l:acquire()
    local code = interrupt(function(ready) ready() l:acquire() end)
    assert.are.equal(1, code)
    assert.is_true(l:_is_mine())
    l:release()
    assert.is_true(l:acquire(0))
    l:release()
  end)

  it("in RLock:acquire(60)", function()
    local l <close> = mp.RLock()
    l:acquire()
    local code = interrupt(function(ready) ready() l:acquire(60) end)
    assert.are.equal(1, code)
    assert.are.equal(1, l:_count())
    l:release()
    assert.is_false(l:locked())
  end)

  it("in Semaphore:acquire(), taking nothing", function()
    local s <close> = mp.Semaphore(0)
    local code = interrupt(function(ready) ready() s:acquire() end)
    assert.are.equal(1, code)
    assert.are.equal(0, s:get_value())
    s:release()
    assert.is_true(s:acquire(0))
  end)

  it("in Condition:wait(), which takes the lock back (at its level) before the error propagates", function()
    local c <close> = mp.Condition()      -- an RLock
    local code = interrupt(function(ready)
      c:acquire()
      c:acquire()
      ready()
      local ok, err = pcall(c.wait, c)
      -- as Python's Condition.wait on KeyboardInterrupt: the lock is held
      -- again when the error comes out, so the caller's cleanup finds it
      if ok or err ~= "interrupted!" or not c:_lock():_is_mine() or c:_lock():_count() ~= 2 then
        os.exit(7)
      end
      c:release()
      c:release()
      error(err, 0)
    end)
    assert.are.equal(1, code)
    assert.is_true(c:acquire(5))
    assert.truthy(tostring(c):find("waiters=0", 1, true), tostring(c))
    c:release()
  end)

  it("in Condition:wait(), passing on a notification it got meanwhile", function()
    -- two waiters; one is notified and interrupted before it takes the
    -- lock back (the parent holds it): the other one gets the notification
    local c <close> = mp.Condition(mp.Lock())
    local woke <close> = mp.Event()
    local ready1 <close> = mp.Event()
    local ready2 <close> = mp.Event()
    local p1 = spawn(function()
      c:acquire() ready1:set()
      local ok, err = pcall(c.wait, c)
      c:release()
      return (not ok and err == "interrupted!") and 0 or 7
    end)
    assert.is_true(ready1:wait(10))
    assert.is_true(c:acquire(10))        -- p1 is in its wait
    c:release()
    local p2 = spawn(function()
      c:acquire() ready2:set()
      local ok = c:wait(30)
      c:release()
      if ok then woke:set() end
      return ok and 0 or 8
    end)
    assert.is_true(ready2:wait(10))
    assert.is_true(c:acquire(10))        -- p2 is in its wait too
    -- p1 came first; interrupt it while both sleep, then notify one: if
    -- p1 still took it, it must hand it to p2
    p1:interrupt()
    c:notify()
    c:release()
    assert.are.equal(0, join(p1))
    assert.is_true(woke:wait(10))
    assert.are.equal(0, join(p2))
  end)

  it("in Barrier:wait(), which withdraws its party without breaking the barrier", function()
    local b <close> = mp.Barrier(2)
    local code = interrupt(function(ready) ready() b:wait() end)
    assert.are.equal(1, code)
    assert.are.equal(0, b.n_waiting)
    assert.is_false(b.broken)
  end)

  it("and a wait whose signal's handler raises nothing resumes and ends as it would have", function()
    -- a SIGUSR1 handler installed without SA_RESTART, as lua5.4's SIGINT
    -- handler, that raises nothing (core._test.nop_signal): each signal
    -- makes the wait's system call fail with EINTR; the wait goes on
    local sig = core._test.nop_signal()
    local e <close> = mp.Event()
    local l <close> = mp.Lock()
    local go <close> = mp.Event()
    l:acquire()
    local p = spawn(function()
      -- signals come: still times out, on time
      if H.nop_timed_wait(go, function(t) return e:wait(t) end) ~= false then return 3 end
      if not e:wait(30) then return 4 end     -- set after more signals
      if not l:acquire(30) then return 5 end  -- released after more signals
      l:release()
      local _, n = core._test.nop_signal()
      return n >= 5 and 0 or 6
    end)
    H.nop_signals(p, go)
    e:set()
    for _ = 1, 5 do H.sleep(0.02) core.kill(p.pid, sig) end
    l:release()
    assert.are.equal(0, join(p))
  end)
end)
