-- Pipe and Connection: framing, values, bytes, timeouts, closing, wait.
local H = require "helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

describe("Pipe arguments", function()
  it("rejects a non-boolean duplex", function()
    assert.has_error(function() mp.Pipe(1) end)
    assert.has_error(function() mp.Pipe("no") end)
  end)

  it("refuses nil as a message and bad timeouts", function()
    local a, b = mp.Pipe()
    assert.has_error(function() a:send(nil) end)
    assert.has_error(function() a:send() end)
    assert.has_error(function() b:recv(-1) end)
    assert.has_error(function() b:recv("soon") end)
    assert.has_error(function() a:send_bytes({}) end)
    a:close(); b:close()
  end)

  it("makes one-way pipes whose misuse raises", function()
    local r, w = mp.Pipe(false)
    assert.is_true(r.readable); assert.is_false(r.writable)
    assert.is_false(w.readable); assert.is_true(w.writable)
    assert.has_error(function() r:send(1) end, "connection is read-only")
    assert.has_error(function() r:send_bytes("x") end, "connection is read-only")
    assert.has_error(function() w:recv(0) end, "connection is write-only")
    assert.has_error(function() w:poll() end, "connection is write-only")
    r:close(); w:close()
  end)
end)

describe("Connection", function()
  H.leakcheck()

  it("sends values both ways in a duplex pipe", function()
    local a, b = mp.Pipe()
    assert.is_true(a:send(42))
    assert.are.equal(42, b:recv(1))
    b:send("back")
    assert.are.equal("back", a:recv(1))
    a:close(); b:close()
  end)

  it("keeps integers, floats, booleans and strings exact", function()
    local a, b = mp.Pipe()
    for _, v in ipairs(H.scalars(string.rep("x", 1000))) do
      a:send(v)
      H.exact(v, b:recv(1))
    end
    a:send(0 / 0)
    H.exact(0 / 0, b:recv(1))
    a:close(); b:close()
  end)

  it("sends tables with shared references and cycles", function()
    local a, b = mp.Pipe()
    a:send(H.cyclic())
    H.same_cyclic(b:recv(1))
    a:close(); b:close()
  end)

  it("sends raw bytes, slices and empty messages", function()
    local a, b = mp.Pipe()
    a:send_bytes("hello")
    a:send_bytes("")
    a:send_bytes("abcdef", 2, 4)
    a:send_bytes("abcdef", -2)
    a:send_bytes("abc", 3, 2)
    assert.are.equal("hello", b:recv_bytes(1))
    assert.are.equal("", b:recv_bytes(1))
    assert.are.equal("bcd", b:recv_bytes(1))
    assert.are.equal("ef", b:recv_bytes(1))
    assert.are.equal("", b:recv_bytes(1))
    a:close(); b:close()
  end)

  it("never merges or splits messages", function()
    local a, b = mp.Pipe()
    for i = 1, 200 do a:send_bytes(string.rep("m", i)) end
    for i = 1, 200 do assert.are.equal(i, #b:recv_bytes(1)) end
    a:close(); b:close()
  end)

  it("times out with nil, 'timeout' and polls", function()
    local a, b = mp.Pipe()
    assert.are.same({ nil, "timeout" }, { b:recv(0) })
    assert.are.same({ nil, "timeout" }, { b:recv(0.05) })
    assert.are.same({ nil, "timeout" }, { b:recv_bytes(0.01) })
    assert.is_false(b:poll())
    assert.is_false(b:poll(0.02))
    a:send_bytes("x")
    assert.is_true(b:poll(1))
    assert.is_true(b:poll())          -- still there: poll does not consume
    assert.are.equal("x", b:recv(1))
    a:close(); b:close()
  end)

  it("returns nil, 'closed' at the end of the stream, after what was sent", function()
    local a, b = mp.Pipe()
    a:send("last")
    a:close()
    assert.is_true(b:poll())
    assert.are.equal("last", b:recv(1))
    assert.are.same({ nil, "closed" }, { b:recv(1) })
    assert.are.same({ nil, "closed" }, { b:recv_bytes() })
    b:close()
  end)

  it("returns nil, 'closed' when sending to a closed peer (no SIGPIPE)", function()
    local a, b = mp.Pipe()
    b:close()
    assert.are.same({ nil, "closed" }, { a:send("x") })
    assert.are.same({ nil, "closed" }, { a:send_bytes(string.rep("y", 1 << 20)) })
    a:close()
  end)

  it("raises on use after close, and close is idempotent", function()
    local a, b = mp.Pipe()
    a:close(); a:close()
    assert.is_true(a.closed)
    assert.is_false(a.readable)
    assert.are.equal("<Connection(closed)>", tostring(a))
    assert.has_error(function() a:send(1) end, "connection is closed")
    assert.has_error(function() a:recv(0) end, "connection is closed")
    assert.has_error(function() a:fileno() end, "connection is closed")
    b:close()
  end)

  it("names its fd and direction in tostring", function()
    local a, b = mp.Pipe()
    assert.truthy(tostring(a):match("^<Connection%(fd=%d+, duplex%)>$"))
    local r, w = mp.Pipe(false)
    assert.truthy(tostring(r):find("read-only", 1, true))
    assert.truthy(tostring(w):find("write-only", 1, true))
    assert.are.equal("integer", math.type(a:fileno()))
    a:close(); b:close(); r:close(); w:close()
  end)

  it("closes as a to-be-closed variable and by the collector", function()
    local fd
    do
      local a, b = mp.Pipe()
      local ca <close> = a   -- luacheck: ignore 211
      local cb <close> = b   -- luacheck: ignore 211
      fd = a:fileno()
    end
    for _ = 1, 50 do mp.Pipe() end
    collectgarbage(); collectgarbage()
    assert.is_nil(io.open("/proc/self/fd/" .. fd))
  end)

  it("carries 16 MiB and larger messages between processes", function()
    local a, b = mp.Pipe()
    local p = mp.Process{ target = function(c)
      local s = c:recv_bytes(10)
      c:send_bytes(s)
      c:send(#s)
    end, args = { b } }
    p:start()
    local big = string.rep("0123456789abcdef", (20 << 20) // 16)
    a:send_bytes(big)
    local back = a:recv_bytes(20)
    assert.are.equal(#big, #back)
    assert.is_true(back == big)
    assert.are.equal(#big, a:recv(5))
    assert.are.equal(0, p:join(5))
    a:close(); b:close()
  end)

  it("keeps a message cut by a recv's timeout, and the next recv gets it whole", function()
    local SIGSTOP, SIGCONT = 19, 18
    local a, b = mp.Pipe()
    local n = 8 << 20                        -- far more than a socket holds
    local p = mp.Process{ target = function(c)
      c:send_bytes(string.rep("x", n))
      c:send({ "after", 1 })
    end, args = { b } }
    p:start()
    b:close()
    assert.is_true(a:poll(10))               -- the message has begun
    core.kill(p.pid, SIGSTOP)                -- the sender stalls in its middle
    assert.are.same({ nil, "timeout" }, { a:recv_bytes(0.2) })
    assert.are.same({ nil, "timeout" }, { a:recv(0) })   -- still cut
    local x, y = mp.Pipe()
    assert.has_error(function() x:send(a) end)   -- it holds unread data
    x:close(); y:close()
    core.kill(p.pid, SIGCONT)
    local s = a:recv_bytes(20)
    assert.are.equal(n, #s)
    assert.is_nil(s:find("[^x]"))
    assert.are.same({ "after", 1 }, a:recv(10))
    assert.are.equal(0, p:join(10))
    a:close()
  end)

  it("passes a value message to recv_bytes as its encoding and bytes to recv as a string", function()
    local a, b = mp.Pipe()
    a:send_bytes("raw")
    assert.are.equal("raw", b:recv(1))
    a:send({ 1, 2 })
    assert.are.equal("string", type(b:recv_bytes(1)))
    a:close(); b:close()
  end)

  it("talks both ways with a child process", function()
    local a, b = mp.Pipe()
    local p = mp.Process{ target = function(c)
      while true do
        local v = c:recv(5)
        if v == nil or v == "stop" then break end
        c:send(v * 2)
      end
    end, args = { b } }
    p:start()
    for i = 1, 100 do
      a:send(i)
      assert.are.equal(i * 2, a:recv(5))
    end
    a:send("stop")
    assert.are.equal(0, p:join(5))
    a:close(); b:close()
  end)

  it("passes a connection through a pipe to another process", function()
    local a, b = mp.Pipe()
    local x, y = mp.Pipe()
    local p = mp.Process{ target = function(c)
      local conn = c:recv(5)
      conn:send("through " .. tostring(conn.readable and conn.writable))
      conn:close()
    end, args = { b } }
    p:start()
    assert.is_true(a:send(y))
    y:close()                       -- the child received its own copy
    assert.are.equal("through true", x:recv(5))
    assert.are.equal(0, p:join(5))
    a:close(); b:close(); x:close()
  end)

  it("refuses to send a connection with unread buffered data", function()
    local a, b = mp.Pipe()
    local x, y = mp.Pipe()
    y:send_bytes("1"); y:send_bytes("2")
    assert.are.equal("1", x:recv_bytes(1))   -- "2" stays buffered in x
    assert.has_error(function() a:send(x) end)
    a:close(); b:close(); x:close(); y:close()
  end)

  it("sees the end of the stream when the child holding the other end exits", function()
    local a, b = mp.Pipe()
    local p = mp.Process{ target = function(c) c:send("bye") end, args = { b } }
    p:start()
    b:close()                       -- the parent's copy
    assert.are.equal("bye", a:recv(5))
    assert.are.same({ nil, "closed" }, { a:recv(5) })
    p:join(5)
    a:close()
  end)
end)

describe("mp.wait", function()
  H.leakcheck()

  it("rejects what cannot be waited on", function()
    assert.has_error(function() mp.wait(5) end)
    assert.has_error(function() mp.wait({ {} }) end)
    assert.has_error(function() mp.wait({ mp.Process() }) end)
    assert.has_error(function() mp.wait({}, -1) end)
  end)

  it("raises on a number that is not an open file descriptor", function()
    local a, b = mp.Pipe()
    a:send_bytes("x")
    for _, bad in ipairs({ -1, 99999, 1.5, 1 << 40, 2^40 }) do
      local ok, err = pcall(mp.wait, { b, bad }, 0)
      assert.is_false(ok)
      assert.matches("bad argument #1 to 'wait' (objects[2] is not an open file descriptor: " .. tostring(bad) .. ")",
                     err, 1, true)
    end
    local fd = b:fileno()
    b:close()
    assert.error_matches(function() mp.wait({ fd }, 0) end,
                         "bad argument #1 to 'wait' (objects[1] is not an open file descriptor: " .. fd .. ")", 1, true)
    a:close()
  end)

  it("returns an empty list on timeout", function()
    local a, b = mp.Pipe()
    assert.are.same({}, mp.wait({ a, b }, 0.02))
    a:close(); b:close()
  end)

  it("returns the ready connections and finished processes", function()
    local a, b = mp.Pipe()
    local c, d = mp.Pipe()
    local p = mp.Process{ target = function(conn) conn:send("hi") end, args = { d } }
    p:start()
    local got = mp.wait({ a, c }, 5)
    assert.are.same({ c }, got)
    assert.are.same({ p }, mp.wait({ p }, 5))
    a:send(1)
    local both = mp.wait({ b, c }, 5)
    assert.are.equal(2, #both)
    p:join(5)
    a:close(); b:close(); c:close(); d:close()
  end)

  it("waits for a process that has no pidfd (old kernels, valgrind)", function()
    core._test.no_pidfd(true)
    local go <close> = mp.Event()
    local ok, p = pcall(function()
      local q = mp.Process{ target = function() go:wait(10) end }
      q:start()
      return q
    end)
    core._test.no_pidfd(false)
    assert.is_true(ok, p)
    assert.is_nil(p.sentinel)
    assert.are.same({}, mp.wait({ p }, 0.1))     -- still running
    go:set()
    assert.are.same({ p }, mp.wait({ p }, 10))
    assert.are.equal(0, p:join(5))
  end)

  it("sees messages already buffered in a connection", function()
    local a, b = mp.Pipe()
    a:send_bytes("one"); a:send_bytes("two")
    assert.are.equal("one", b:recv_bytes(1))   -- "two" is now buffered
    assert.are.same({ b }, mp.wait({ b }, 0))
    assert.are.equal("two", b:recv_bytes(0))
    a:close(); b:close()
  end)

  it("accepts raw file descriptors", function()
    local a, b = mp.Pipe()
    a:send_bytes("x")
    assert.are.same({ b:fileno() }, mp.wait({ b:fileno() }, 1))
    a:close(); b:close()
  end)
end)

-- Ctrl-C (see H.interrupt_wait): a connection's wait gives way to it at
-- once, and the stream stays whole.
describe("SIGINT interrupts a blocked wait", function()
  H.leakcheck()
  local interrupt = H.interrupt_wait
  local SIGSTOP, SIGCONT = 19, 18         -- Linux (x86, arm)

  it("in Connection:recv() with nothing coming; the connection goes on", function()
    local a, b = mp.Pipe()
    local code = interrupt(function(ready) ready() b:recv() end)
    assert.are.equal(1, code)
    a:send("after")
    assert.are.equal("after", b:recv(5))
    a:close(); b:close()
  end)

  it("in Connection:recv(60) and Connection:poll(60)", function()
    local a, b = mp.Pipe()
    for _, wait in ipairs{ b.recv, b.poll } do
      local code = interrupt(function(ready) ready() wait(b, 60) end)
      assert.are.equal(1, code)
    end
    a:close(); b:close()
  end)

  it("in mp.wait() on a connection", function()
    local a, b = mp.Pipe()
    local code = interrupt(function(ready) ready() mp.wait({ b }) end)
    assert.are.equal(1, code)
    a:close(); b:close()
  end)

  it("in Connection:recv_bytes() or recv() in the middle of a message, which the next recv gets whole", function()
    local big = string.rep("0123456789abcdef", 1 << 18)      -- 4 MiB
    for _, how in ipairs{ { "send_bytes", "recv_bytes" }, { "send", "recv" } } do
      local send, recv = how[1], how[2]
      local a, b = mp.Pipe()
      local go <close> = mp.Event()
      local cut <close> = mp.Event()
      -- the sender fills the socket and blocks; it is stopped there, so the
      -- receiver, once let go, reads the start of the payload and waits for
      -- the rest
      local sender = H.start(function() a[send](a, big) return 0 end)
      local receiver = H.start(function()
        go:wait(10)
        local ok, err = pcall(b[recv], b)
        if ok or err ~= "interrupted!" then return 7 end
        cut:set()
        local s = b[recv](b, 30)
        return s == big and 0 or 8
      end)
      H.sleep(0.2)
      core.kill(sender.pid, SIGSTOP)
      go:set()
      H.sleep(0.2)
      receiver:interrupt()
      local was_cut = cut:wait(10)
      core.kill(sender.pid, SIGCONT)            -- whatever happened
      local rcode, scode = H.finish(receiver), H.finish(sender)
      a:close(); b:close()
      assert.is_true(was_cut, recv)
      assert.are.equal(0, rcode, recv)
      assert.are.equal(0, scode, recv)
    end
  end)

  it("in Connection:send_bytes() in the middle of a message, whose rest goes with the next send", function()
    local a, b = mp.Pipe()
    local big = string.rep("0123456789abcdef", 1 << 18)      -- 4 MiB
    local ready <close> = mp.Event()
    local cut <close> = mp.Event()
    local p = H.start(function()
      ready:set()
      local ok, err = pcall(a.send_bytes, a, big)        -- nobody reads yet
      if ok or err ~= "interrupted!" then return 7 end
      if pcall(mp.dumps, a) then return 9 end            -- half a message is in it
      cut:set()
      a:send_bytes("next")                               -- the rest first
      return 0
    end)
    assert.is_true(ready:wait(10))
    H.sleep(0.2)
    p:interrupt()
    assert.is_true(cut:wait(10))
    assert.are.equal(big, b:recv_bytes(30))
    assert.are.equal("next", b:recv_bytes(30))
    assert.are.equal(0, H.finish(p))
    a:close(); b:close()
  end)

  it("and a recv whose signal's handler raises nothing resumes and returns its message", function()
    local a, b = mp.Pipe()
    local go <close> = mp.Event()
    local p = H.start(function()
      -- signals come: still times out, on time
      local v, why = H.nop_timed_wait(go, function(t) return b:recv(t) end)
      if v ~= nil or why ~= "timeout" then return 3 end
      v = b:recv()                         -- sent after more signals
      local _, n = core._test.nop_signal()
      return (v == "hello" and n >= 5) and 0 or 4
    end)
    H.nop_signals(p, go)
    a:send("hello")
    assert.are.equal(0, H.finish(p))
    a:close(); b:close()
  end)
end)

-- A message that carries handles (their fds travel with it, SCM_RIGHTS)
-- while its sender or its receiver dies: what arrived works, and nothing
-- is left open in this process once every end is closed.
describe("handles in flight when a process dies", function()
  H.leakcheck()
  local signal_kill = 9
  local function stop_server(method)
    if method == "forkserver" then require("multiprocessing.spawn")._forkserver_stop() end
  end

  for _, method in ipairs({ "fork", "spawn", "forkserver" }) do
    it("a sender killed right after sending (" .. method .. ")", function()
      local a, b = mp.Pipe()
      local p = mp.Process{ start_method = method, args = { b }, target = function(c)
        local ev, r, w = mp.Event(), mp.Pipe(false)
        w:send("from the dead")
        c:send({ ev = ev, r = r, w = w })
        core.kill(core.getpid(), 9)
      end }
      p:start()
      local got = a:recv(30)
      assert.are.equal(-signal_kill, p:join(30))
      p:close(); b:close()
      assert.are.equal("from the dead", got.r:recv(5))
      assert.is_false(got.ev:is_set())
      got.ev:set()
      assert.is_true(got.ev:wait(0))
      got.w:send(7)
      assert.are.equal(7, got.r:recv(5))
      got.r:close(); got.w:close(); a:close()
      stop_server(method)
    end)

    it("a receiver killed before it reads (" .. method .. ")", function()
      local a, b = mp.Pipe()
      local ready = mp.Event()
      local p = mp.Process{ start_method = method, args = { ready }, target = function(e)
        e:set()
        mp.Event():wait(60)             -- never reads
      end }
      p:start()
      assert.is_true(ready:wait(30))
      local r, w = mp.Pipe(false)
      local lock = mp.Lock()
      assert.is_true(a:send({ r = r, w = w, lock = lock }))
      p:kill()
      assert.are.equal(-signal_kill, p:join(30))
      p:close()
      -- the message still waits in b: it arrives whole, its handles work
      local got = b:recv(5)
      got.w:send("still")
      assert.are.equal("still", r:recv(5))
      assert.is_true(got.lock:acquire(0))
      assert.is_false(lock:acquire(0))
      got.lock:release()
      -- and a message nobody reads is closed with the pipe, fds and all
      a:send({ r = r, w = w })
      r:close(); w:close(); got.r:close(); got.w:close()
      a:close(); b:close()
      stop_server(method)
    end)
  end
end)
