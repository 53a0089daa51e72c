-- Waiting in an event loop: every waitable speaks cqueues' polling
-- protocol (pollfd, events, timeout) and gives fileno() to luv; readable
-- means "try now", and the call with timeout 0 makes progress. Real
-- cqueues and luv (Debian lua-cqueues, lua-luv).
local H = require "helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local cqueues = require "cqueues"
local uv = require "luv"

-- cqueues.poll(obj, t) outside a loop: obj when it is ready, else (the
-- timeout ran out) the number t
local function ready_within(obj, t) return cqueues.poll(obj, t) == obj end

local function sleep_then(t, v)
  require("multiprocessing.core").poll({}, t)
  return v
end

-- cqueues' poller for calls outside a loop and luv's default loop hold
-- fds for the life of the process: make them now, before the leak checks.
cqueues.poll(0)
uv.run("nowait")

-- Run the luv loop until done() or 10 s; closes the guard timer.
local function uv_run_until(done)
  uv.update_time()                          -- (the loop's clock is its last run's)
  local guard = uv.new_timer()
  local expired = false
  guard:start(10000, 0, function() expired = true; uv.stop() end)
  while not done() and not expired do uv.run("once") end
  guard:stop(); guard:close()
  uv.run("nowait")                          -- let the closes complete
  return done()
end

describe("the polling protocol", function()
  H.leakcheck()

  it("is spoken by every waitable: pollfd is fileno, events is 'r'", function()
    local a, b = mp.Pipe()
    local l = mp.Listener("127.0.0.1:0")
    local kl = mp.Listener("127.0.0.1:0", { authkey = "k" })
    local q, sq, jq = mp.Queue(), mp.SimpleQueue(), mp.JoinableQueue()
    local pool = mp.Pool(1)
    local r = pool:submit(function() return 1 end)
    local p = H.start(function() end)
    for _, o in ipairs { a, b, l, kl, q, sq, jq, pool, r, p } do
      assert.are.equal(o:fileno(), o:pollfd(), tostring(o))
      assert.are.equal("r", o:events())
      local t = o:timeout()
      assert.is_true(t == nil or t >= 0)
    end
    assert.are.equal(pool:fileno(), r:fileno())
    assert.are.equal(p.sentinel, p:pollfd())
    assert.are.equal(0, H.finish(p, 10))
    r:get(10)
    pool:terminate()
    a:close(); b:close(); l:close(); kl:close(); q:close(); sq:close(); jq:close()
    assert.has_error(function() a:pollfd() end)
    assert.has_error(function() q:pollfd() end)
    assert.has_error(function() pool:pollfd() end)
    local unstarted = mp.Process{ target = print }
    assert.has_error(function() unstarted:pollfd() end, "cannot poll a process that was not started")
    p = H.start(function() end)
    H.finish(p, 10)
    assert.has_error(function() p:pollfd() end, "process object is closed")
  end)
end)

describe("cqueues.poll", function()
  H.leakcheck()

  it("waits for a Connection, and returns at once for a message already buffered", function()
    local a, b <close> = mp.Pipe()
    assert.is_false(ready_within(a, 0.05))
    b:send(1); b:send(2)
    assert.is_true(ready_within(a, 10))
    assert.are.equal(1, a:recv(0))
    -- the second message may sit in a's buffer, where the fd shows nothing
    assert.is_true(ready_within(a, 10))
    assert.are.equal(2, a:recv(0))
    assert.is_nil(a:timeout())
    assert.is_false(ready_within(a, 0.05))
    b:close()
    assert.is_true(ready_within(a, 10))       -- the end: recv says "closed"
    assert.are.same({ nil, "closed" }, { a:recv(0) })
    a:close()
  end)

  it("waits for a Listener's connection", function()
    local l <close> = mp.Listener("127.0.0.1:0")
    assert.is_false(ready_within(l, 0.05))
    local c <close> = mp.Client(l.address)
    assert.is_true(ready_within(l, 10))
    local s <close> = l:accept(0)
    assert.is_not_nil(s)
    c:send("x")
    assert.is_true(ready_within(s, 10))
    assert.are.equal("x", s:recv(0))
  end)

  it("drives a keyed Listener's handshakes from a cqueues loop", function()
    local l <close> = mp.Listener("127.0.0.1:0", { authkey = "k" })
    local p = H.start(function(addr)
      local c = mp.Client(addr, { authkey = "k" })
      c:send("hi")
      return c:recv(10) == "bye" and 0 or 3
    end, l.address)
    local loop = cqueues.new()
    local got
    loop:wrap(function()
      local c
      repeat
        cqueues.poll(l)                       -- no timeout: the Listener's says when
        c = l:accept(0)
      until c
      cqueues.poll(c)
      got = c:recv(0)
      c:send("bye")
      c:close()
    end)
    assert(loop:loop(10))
    assert.is_true(loop:empty(), "the loop did not finish")
    assert.are.equal("hi", got)
    assert.are.equal(0, H.finish(p, 10))
    assert.is_nil(l:timeout())                -- nothing pending any more
  end)

  it("waits for a Process to end (its sentinel), and without a pidfd looks every 20 ms", function()
    local go <close> = mp.Event()
    local p = H.start(function() go:wait(10) end)
    assert.is_false(ready_within(p, 0.05))
    go:set()
    assert.is_true(ready_within(p, 10))
    assert.are.equal(0, p:join(0))
    p:close()
    go:clear()
    core._test.no_pidfd(true)
    local ok, q = pcall(H.start, function() go:wait(10) end)
    core._test.no_pidfd(false)
    assert(ok, q)
    assert.is_nil(q:pollfd())
    assert.are.equal(0.02, q:timeout())
    assert.has_error(function() q:fileno() end, "process has no sentinel (no pidfd on this kernel)")
    go:set()
    local deadline = core.monotonic() + 10
    while q:timeout() ~= 0 and core.monotonic() < deadline do cqueues.poll(q, 1) end
    assert.are.equal(0, q:timeout())
    assert.are.equal(0, H.finish(q, 10))
  end)

  it("waits for a Queue, a SimpleQueue and a JoinableQueue to hold an item", function()
    for _, make in ipairs { mp.Queue, mp.SimpleQueue, mp.JoinableQueue } do
      local q <close> = make()
      assert.is_false(ready_within(q, 0.05))
      local p = H.start(function() q:put("item") end)
      assert.is_true(ready_within(q, 10))
      assert.are.equal(0, q:timeout())        -- an item is there: try now
      assert.are.equal("item", q:get(0))
      assert.is_nil(q:timeout())
      assert.is_false(ready_within(q, 0.05))   -- empty again: no wake-up
      assert.are.equal(0, H.finish(p, 10))
    end
  end)

  for _, m in ipairs { "fork", "spawn", "forkserver" } do
    it("waits for a Pool's news and an AsyncResult's result (" .. m .. ")", function()
      local pool = mp.get_context(m).Pool(2)
      local ok, err = pcall(function()
        pool:submit(function() return 1 end)
        assert.is_true(ready_within(pool, 10))
        local r = pool:submit(sleep_then, 0.05, "late")
        local polls = 0
        while not r:ready() and polls < 100 do
          cqueues.poll(r, 10)
          polls = polls + 1
        end
        assert.are.equal("late", r:get(0))
        assert.is_true(ready_within(r, 10))    -- ready: timeout() is 0
      end)
      pool:terminate()
      if m == "forkserver" then require("multiprocessing.spawn")._forkserver_stop() end
      assert(ok, err)
    end)
  end

  -- (regression: a step that handed out a queued task left it in the
  -- pool's output buffer until the next wait, so an event loop, which
  -- waits for the pool's fd instead, waited for a result that never came)
  it("sends the work a step handed out before the call returns", function()
    local pool <close> = mp.Pool(1)
    local a = pool:submit(sleep_then, 0.05, "a")
    local b = pool:submit(sleep_then, 0.05, "b")   -- queued: the worker holds a
    while not a:ready() do cqueues.poll(a, 10) end    -- this step hands b out
    assert.is_true(ready_within(b, 10))
    assert.are.equal("b", b:get(0))
  end)

  it("lets many coroutines wait for their own results of one pool", function()
    local pool <close> = mp.Pool(2)
    local loop = cqueues.new()
    local got = {}
    for i = 1, 6 do
      loop:wrap(function()
        local r = pool:submit(sleep_then, 0.01 * i, i * 10)
        while not r:ready() do cqueues.poll(r) end
        got[i] = r:get(0)
      end)
    end
    assert(loop:loop(20))
    assert.is_true(loop:empty(), "the loop did not finish")
    assert.are.same({ 10, 20, 30, 40, 50, 60 }, got)
  end)
end)

describe("closing what a cqueues coroutine polled", function()
  H.leakcheck()

  -- (regression: a descriptor closed while a controller still had it
  -- installed made the next step fail: "unable to update event
  -- disposition: Bad file descriptor")
  it("cancels the descriptor first: close, <close>, a Pool's terminate", function()
    local loop = cqueues.new()
    local done = 0
    loop:wrap(function()
      local a, b = mp.Pipe()
      b:send(1)
      cqueues.poll(a)
      a:close(); b:close()
      done = done + 1
    end)
    loop:wrap(function()
      do
        local q <close> = mp.Queue()
        q:put(1)
        cqueues.poll(q)
      end
      done = done + 1
    end)
    loop:wrap(function()
      local pool = mp.Pool(1)
      local r = pool:submit(function() return 1 end)
      while not r:ready() do cqueues.poll(r) end
      pool:terminate()
      done = done + 1
    end)
    loop:wrap(function()
      local p = H.start(function() end)
      cqueues.poll(p)
      H.finish(p, 10)                         -- closes it
      done = done + 1
    end)
    loop:wrap(function()
      local l = mp.Listener("127.0.0.1:0")
      local c = mp.Client(l.address)
      cqueues.poll(l)
      local s = l:accept(0)
      l:close(); s:close(); c:close()
      cqueues.sleep(0.01)                     -- one more cycle
      done = done + 1
    end)
    local ok, err = loop:loop(20)
    assert(ok, err)
    assert.are.equal(5, done)
    assert.is_true(loop:empty())
  end)

  it("wakes a coroutine that still polls an object another one closed", function()
    local loop = cqueues.new()
    local a, b = mp.Pipe()
    local woke = false
    loop:wrap(function() cqueues.poll(a); woke = true end)
    loop:wrap(function() cqueues.sleep(0.05); a:close() end)
    local ok, err = loop:loop(10)
    assert(ok, err)
    assert.is_true(woke)
    b:close()
  end)
end)

describe("luv's uv.new_poll", function()
  H.leakcheck()

  it("watches a Queue's fileno", function()
    local q <close> = mp.Queue()
    local got
    local poll = uv.new_poll(q:fileno())
    poll:start("r", function()
      local v = q:get(0)
      if v ~= nil then got = v; poll:stop() end
    end)
    local p = H.start(function() q:put({ 1, 2 }) end)
    assert.is_true(uv_run_until(function() return got ~= nil end))
    poll:close()
    uv.run("nowait")
    assert.are.same({ 1, 2 }, got)
    assert.are.equal(0, H.finish(p, 10))
  end)

  it("watches a Pool's fileno and calls poll; done callbacks give the results", function()
    local pool <close> = mp.Pool(2)
    local got, n = {}, 0
    for i = 1, 5 do
      pool:submit(sleep_then, 0.01, i):add_done_callback(function(r)
        got[i] = r:get(0)
        n = n + 1
      end)
    end
    local poll = uv.new_poll(pool:fileno())
    poll:start("r", function() pool:poll() end)
    assert.is_true(uv_run_until(function() return n == 5 end))
    poll:stop(); poll:close()
    uv.run("nowait")
    assert.are.same({ 1, 2, 3, 4, 5 }, got)
  end)

  it("watches a Process's sentinel and a Connection", function()
    local a, b = mp.Pipe()
    local p = H.start(function() b:send("from child") end)
    local ended, msg = false, nil
    local pp = uv.new_poll(p:fileno())
    pp:start("r", function() ended = true; pp:stop() end)
    local pc = uv.new_poll(a:fileno())
    pc:start("r", function()
      local v = a:recv(0)
      if v ~= nil then msg = v; pc:stop() end
    end)
    assert.is_true(uv_run_until(function() return ended and msg ~= nil end))
    pp:close(); pc:close()
    uv.run("nowait")
    assert.are.equal("from child", msg)
    assert.are.equal(0, H.finish(p, 10))
    a:close(); b:close()
  end)
end)
