-- Listener and Client over TCP and Unix sockets, with and without authkey.
local H = require "helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local auth = require "multiprocessing.auth"

local function hex(s)
  return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

describe("HMAC-SHA256", function()
  it("gives the known digests", function()
    assert.are.equal("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
                     hex(auth.sha256("abc")))
    assert.are.equal("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                     hex(auth.sha256("")))
    -- RFC 4231, test case 2
    assert.are.equal("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
                     hex(auth.hmac_sha256("Jefe", "what do ya want for nothing?")))
    -- a key longer than the block is hashed first (RFC 4231, test case 6)
    assert.are.equal("60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
                     hex(auth.hmac_sha256(string.rep("\170", 131),
                       "Test Using Larger Than Block-Size Key - Hash Key First")))
  end)

  it("gives the RFC 4231 digests (test cases 1, 7) and takes an empty key", function()
    assert.are.equal("b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
                     hex(auth.hmac_sha256(string.rep("\11", 20), "Hi There")))
    assert.are.equal("9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
                     hex(auth.hmac_sha256(string.rep("\170", 131),
                       "This is a test using a larger than block-size key and a larger than " ..
                       "block-size data. The key needs to be hashed before being used by the " ..
                       "HMAC algorithm.")))
    assert.are.equal("b613679a0814d9ec772f95d778c35fc5ff1697c493715653c6c712144292c5ad",
                     hex(auth.hmac_sha256("", "")))
    -- a message longer than a block (FIPS 180-4's "a" x 1000)
    assert.are.equal("41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3",
                     hex(auth.sha256(string.rep("a", 1000))))
  end)

  it("compares digests", function()
    local d = auth.hmac_sha256("k", "m")
    assert.is_true(auth.equal_digest(d, auth.hmac_sha256("k", "m")))
    assert.is_false(auth.equal_digest(d, auth.hmac_sha256("k", "n")))
    assert.is_false(auth.equal_digest(d, d:sub(1, 31)))
    assert.is_true(auth.equal_digest("", ""))
  end)

  it("draws random challenges", function()
    assert.are.equal(32, #auth.random_bytes(32))
    assert.are_not.equal(auth.random_bytes(32), auth.random_bytes(32))
    assert.are.equal("", auth.random_bytes(0))
    assert.are.equal(256, #auth.random_bytes(256))
    assert.has_error(function() auth.random_bytes(257) end)
    assert.has_error(function() auth.random_bytes(-1) end)
  end)

  it("draws different bytes in forked children than in the parent", function()
    auth.random_bytes(32) -- the parent's generator is seeded before the fork
    local a, b = mp.Pipe()
    local ps = {}
    for i = 1, 2 do
      ps[i] = mp.get_context("fork").Process{
        target = function(c) c:send(auth.random_bytes(32)) end, args = { b } }
      ps[i]:start()
    end
    local seen = { [auth.random_bytes(32)] = true }
    for _ = 1, 2 do
      local r = a:recv(10)
      assert.are.equal(32, #r)
      assert.is_nil(seen[r])
      seen[r] = true
    end
    for i = 1, 2 do assert.are.equal(0, ps[i]:join(10)) end
    a:close(); b:close()
  end)
end)

describe("Listener and Client arguments", function()
  it("reject bad addresses and options", function()
    assert.has_error(function() mp.Listener(5) end)
    assert.has_error(function() mp.Listener("") end)
    assert.has_error(function() mp.Listener("127.0.0.1:0", { authkey = 5 }) end)
    assert.has_error(function() mp.Listener("127.0.0.1:0", { bogus = 1 }) end)
    assert.has_error(function() mp.Client("127.0.0.1:0", { backlog = 5 }) end)
    assert.has_error(function() mp.Listener(string.rep("x", 200)) end)
  end)

  it("raise on a port out of range (getaddrinfo would take it modulo 65536)", function()
    for _, f in ipairs({ "Listener", "Client" }) do
      local ok, err = pcall(mp[f], "127.0.0.1:99999")
      assert.is_false(ok)
      assert.matches("bad argument #1 to '" .. f .. "' (port 99999 out of range 0..65535)", err, 1, true)
      ok, err = pcall(mp[f], "[::1]:65536")
      assert.is_false(ok)
      assert.matches("port 65536 out of range", err, 1, true)
    end
    assert.has_error(function() core.listen("127.0.0.1", "70000") end)
    assert.has_error(function() core.connect("127.0.0.1", "123456789012345678901234") end)
    local l = mp.Listener("127.0.0.1:00000")       -- leading zeros: port 0
    assert.truthy(l.address:match("^127%.0%.0%.1:%d+$"))
    l:close()
  end)

  it("raise when nothing listens", function()
    local l = mp.Listener("127.0.0.1:0")
    local addr = l.address
    l:close()
    assert.has_error(function() mp.Client(addr) end)
    assert.has_error(function() mp.Client(H.tmpname("nosock")) end)
    -- as an OSError object carrying errno (ECONNREFUSED, ENOENT)
    local ok, err = pcall(mp.Client, addr)
    assert.is_false(ok)
    assert.is_true(mp.OSError:is(err))
    assert.are.equal(111, err.errno)
    assert.matches("^cannot connect to '127%.0%.0%.1:%d+': ", err.message)
    ok, err = pcall(mp.Client, H.tmpname("nosock"))
    assert.is_false(ok)
    assert.is_true(mp.OSError:is(err))
    assert.are.equal(2, err.errno)
  end)

  it("raise an OSError with EMFILE when descriptors run out, and go on after", function()
    H.run_ok([[
      local mp = require "multiprocessing"
      local keep, err = {}, nil
      while true do
        local ok, a, b = pcall(mp.Pipe)
        if not ok then err = a break end
        keep[#keep + 1] = a; keep[#keep + 1] = b
      end
      assert(mp.OSError:is(err), tostring(err))
      assert(err.errno == 24, tostring(err.errno))          -- EMFILE
      assert(err.message:find("^socketpair: "), err.message)
      for i = 1, 4 do keep[i]:close() end
      local a, b = mp.Pipe()                                -- room again
      a:send("ok")
      print(b:recv(1))
    ]], 30, "ulimit -n 64;")
  end)
end)

describe("Listener", function()
  H.leakcheck()

  it("accepts a TCP client in another process and talks both ways", function()
    local l = mp.Listener("127.0.0.1:0")
    assert.truthy(l.address:match("^127%.0%.0%.1:%d+$"))
    assert.are.equal("<Listener(" .. l.address .. ")>", tostring(l))
    local p = mp.Process{ target = function(addr)
      local c = mp.Client(addr)
      c:send({ n = 41 })
      c:send(c:recv(5) + 1)
      c:close()
    end, args = { l.address } }
    p:start()
    local c = assert(l:accept(5))
    assert.are.equal(41, c:recv(5).n)
    c:send(1)
    assert.are.equal(2, c:recv(5))
    assert.are.same({ nil, "closed" }, { c:recv(5) })
    assert.are.equal(0, p:join(5))
    c:close(); l:close()
  end)

  it("times out in accept", function()
    local l = mp.Listener("127.0.0.1:0")
    assert.are.same({ nil, "timeout" }, { l:accept(0.02) })
    l:close()
  end)

  it("listens on a Unix socket and removes its path when closed", function()
    local path = H.tmpname("sock")
    local l <close> = mp.Listener(path)
    assert.are.equal(path, l.address)
    local p = mp.Process{ target = function() mp.Client(path):send("over unix") end }
    p:start()
    local c = l:accept(5)
    assert.are.equal("over unix", c:recv(5))
    p:join(5)
    c:close()
    l:close()
    assert.is_nil(io.open(path))
    assert.is_true(l.closed)
    assert.are.equal("<Listener(closed)>", tostring(l))
    assert.has_error(function() l:accept(0) end, "listener is closed")
    l:close()
  end)

  it("refuses functions from a peer that proved no key", function()
    local l = mp.Listener("127.0.0.1:0")
    local p = mp.Process{ target = function(addr)
      local c = mp.Client(addr)
      c:send(function() return 1 end)
      c:send("data")
      c:recv(5)
    end, args = { l.address } }
    p:start()
    local c = l:accept(5)
    local ok, err = pcall(c.recv, c, 5)
    assert.is_false(ok)
    assert.is_true(mp.SerializationError:is(err))
    assert.are.equal("data", c:recv(5))
    c:close()
    p:join(5)
    l:close()
  end)

  -- The attack this guards against: a local peer without the key sends an
  -- Array (or Queue) handle, whose memfd it then truncates, and the
  -- receiver's first read of the memory died of SIGBUS.
  local function refuses_handle(kind, make)
    local path = H.tmpname("sock")
    local l <close> = mp.Listener(path)
    local p = mp.Process{ target = function()
      local c = mp.Client(path)
      local h = make()
      c:send(h)
      c:send("plain value")
      c:recv(10)                         -- the parent has looked at both
    end }
    p:start()
    local c <close> = assert(l:accept(10))
    collectgarbage(); collectgarbage()   -- no earlier garbage closes an fd meanwhile
    local before = H.fd_count()          -- nothing read from c yet: no fd came
    local ok, err = pcall(c.recv, c, 10)
    assert.is_false(ok)
    assert.is_true(mp.SerializationError:is(err))
    assert.truthy(err.message:find("handles (" .. kind .. ") are refused from a peer " ..
                                   "that proved no authkey", 1, true))
    assert.are.equal(before, H.fd_count())   -- the memfd that came was closed
    assert.are.equal("plain value", c:recv(10))
    c:send("done")
    assert.are.equal(0, p:join(10))
  end

  it("refuses an Array handle from a peer that proved no key (regression: SIGBUS " ..
     "after the peer truncated the Array's memfd)", function()
    refuses_handle("Array", function() return mp.RawArray("int32", { 1, 2, 3 }) end)
  end)

  it("refuses a Queue handle from a peer that proved no key (regression: SIGBUS " ..
     "after the peer truncated the Queue's memfd)", function()
    refuses_handle("Queue", function() return mp.Queue() end)
  end)

  it("accepts handles from a peer that proved the key", function()
    local path = H.tmpname("sock")
    local l <close> = mp.Listener(path, { authkey = "k3y" })
    local a <close> = mp.RawArray("int32", { 5, 6 })
    local p = mp.Process{ target = function()
      local c = mp.Client(path, { authkey = "k3y" })
      c:send(a)
      c:recv(10)
    end }
    p:start()
    local c <close> = assert(l:accept(10))
    local b <close> = c:recv(10)
    b[2] = 60
    assert.are.equal(60, a[2])
    c:send("done")
    assert.are.equal(0, p:join(10))
  end)

  it("authenticates both sides with an authkey, then trusts functions", function()
    local l = mp.Listener("127.0.0.1:0", { authkey = "s3cret" })
    local p = mp.Process{ target = function(addr)
      local c = mp.Client(addr, { authkey = "s3cret" })
      c:send(function(x) return x * 3 end)
      c:recv(5)
    end, args = { l.address } }
    p:start()
    local c = l:accept(5)
    assert.are.equal(21, c:recv(5)(7))
    c:send("done")
    assert.are.equal(0, p:join(5))
    c:close(); l:close()
  end)

  it("raises AuthenticationError on both sides when the keys differ", function()
    local l = mp.Listener("127.0.0.1:0", { authkey = "right" })
    local a, b = mp.Pipe()
    local p = mp.Process{ target = function(addr, conn)
      local ok, err = pcall(mp.Client, addr, { authkey = "wrong" })
      conn:send(tostring(ok) .. " " .. tostring(err.type))
    end, args = { l.address, b } }
    p:start()
    local ok, err = pcall(l.accept, l, 5)
    assert.is_false(ok)
    assert.is_true(mp.AuthenticationError:is(err))
    assert.are.equal("false AuthenticationError", a:recv(5))
    p:join(5)
    a:close(); b:close(); l:close()
  end)

  it("cannot send handles over TCP", function()
    local l = mp.Listener("127.0.0.1:0")
    local c1 = mp.Client(l.address)
    local c2 = l:accept(5)
    local x, y = mp.Pipe()
    assert.has_error(function() c1:send(x) end)
    c1:close(); c2:close(); x:close(); y:close(); l:close()
  end)
end)

-- Handshakes run side by side inside accept: a peer that connects and says
-- nothing (or too little) must not hold up one that proves the key.
local conn_mod = require "multiprocessing.connection"

-- A peer that connects and never writes, on the client side in this process.
local function raw_connect(addr)
  local host, port = addr:match("^(.*):(%d+)$")
  if host then return core.connect(host, port) end
  return core.connect(addr)
end

-- A child that connects with the key, sends msg and waits for a reply.
local function good_client(addr, key, msg)
  return H.start(function()
    local c = mp.Client(addr, { authkey = key })
    c:send(msg)
    c:recv(10)
    c:close()
  end)
end

for _, tr in ipairs({ { "TCP", function() return "127.0.0.1:0" end },
                      { "a Unix socket", function() return H.tmpname("sock") end } }) do
  local name, new_address = tr[1], tr[2]

  describe("Authenticated Listener over " .. name, function()
    H.leakcheck()

    it("accepts a good client that comes after a silent peer", function()
      local l = mp.Listener(new_address(), { authkey = "k" })
      local silent = raw_connect(l.address)
      local p = good_client(l.address, "k", "after the silent one")
      local c = assert(l:accept(5))
      assert.are.equal("after the silent one", c:recv(5))
      c:send("bye")
      assert.are.equal(0, H.finish(p, 10))
      -- the silent peer was sent its challenge and is still pending
      assert.matches("^#CHALLENGE#", silent:recv_bytes(5))
      assert.are.same({ nil, "timeout" }, { silent:recv_bytes(0) })
      c:close(); silent:close(); l:close()
    end)

    it("keeps a bounded set of pending handshakes, dropping the oldest", function()
      local bound = conn_mod.HANDSHAKE_PENDING
      local l = mp.Listener(new_address(), { authkey = "k" })
      local silent = {}
      for i = 1, bound + 6 do silent[i] = raw_connect(l.address) end
      local p = good_client(l.address, "k", "after the crowd")
      local fds0 = H.fd_count()
      local c = assert(l:accept(5))
      assert.are.equal("after the crowd", c:recv(5))
      -- bound - 1 silent peers and the good one: no more accepted fds
      assert.is_true(H.wait_until(function() return H.fd_count() <= fds0 + bound end, 2))
      c:send("bye")
      assert.are.equal(0, H.finish(p, 10))
      -- the 7 oldest (6 for the crowd, 1 for the good client) were closed
      for i = 1, 7 do
        assert.matches("^#CHALLENGE#", silent[i]:recv_bytes(5))
        assert.are.same({ nil, "closed" }, { silent[i]:recv_bytes(5) })
      end
      for i = 8, bound + 6 do
        assert.matches("^#CHALLENGE#", silent[i]:recv_bytes(5))
        assert.are.same({ nil, "timeout" }, { silent[i]:recv_bytes(0) })
      end
      for _, s in ipairs(silent) do s:close() end
      c:close(); l:close()
    end)

    it("raises AuthenticationError for a wrong key and accepts the good client next", function()
      -- this process plays the good peer step by step, so that its
      -- handshake is half done when the wrong one fails, whatever the order
      local l = mp.Listener(new_address(), { authkey = "k" })
      local good = raw_connect(l.address)
      assert.are.same({ nil, "timeout" }, { l:accept(0.5) })        -- challenged, pending
      local challenge = good:recv_bytes(5)
      good:send_bytes(auth.hmac_sha256("k", challenge))
      local wrong = raw_connect(l.address)
      wrong:send_bytes(string.rep("x", 32))     -- a wrong answer, sent ahead
      local ok, err = pcall(l.accept, l, 5)
      assert.is_false(ok)
      assert.is_true(mp.AuthenticationError:is(err), tostring(err))
      assert.are.equal("digest received was wrong", err.message)
      assert.matches("^#CHALLENGE#", wrong:recv_bytes(5))
      assert.are.equal("#FAILURE#", wrong:recv_bytes(5))
      assert.are.same({ nil, "closed" }, { wrong:recv_bytes(5) })
      -- the good peer's own challenge, and its welcome sent ahead
      local mine = "#CHALLENGE#" .. auth.random_bytes(32)
      good:send_bytes(mine)
      good:send_bytes("#WELCOME#")
      local c = assert(l:accept(5))
      assert.are.equal("#WELCOME#", good:recv_bytes(5))
      assert.are.equal(auth.hmac_sha256("k", mine), good:recv_bytes(5))
      c:send("trusted now")
      assert.are.equal("trusted now", good:recv(5))
      c:close(); good:close(); wrong:close(); l:close()
    end)

    it("closes a handshake that ran out of time and goes on", function()
      local saved = conn_mod.HANDSHAKE_TIMEOUT
      finally(function() conn_mod.HANDSHAKE_TIMEOUT = saved end)
      conn_mod.HANDSHAKE_TIMEOUT = 0.2
      local l = mp.Listener(new_address(), { authkey = "k" })
      local silent = raw_connect(l.address)
      assert.are.same({ nil, "timeout" }, { l:accept(1) })   -- no raise
      assert.matches("^#CHALLENGE#", silent:recv_bytes(5))
      assert.are.same({ nil, "closed" }, { silent:recv_bytes(5) })
      local p = good_client(l.address, "k", "still served")
      local c = assert(l:accept(5))
      assert.are.equal("still served", c:recv(5))
      c:send("bye")
      assert.are.equal(0, H.finish(p, 10))
      c:close(); silent:close(); l:close()
    end)

    it("closes its pending handshakes when closed or collected", function()
      collectgarbage("stop")
      finally(function() collectgarbage("restart") end)
      local fds0 = H.fd_count()
      local function open_fds(n)
        return H.wait_until(function() return H.fd_count() == fds0 + n end, 2)
      end
      local l = mp.Listener(new_address(), { authkey = "k" })
      local silent = { raw_connect(l.address), raw_connect(l.address), raw_connect(l.address) }
      assert.are.same({ nil, "timeout" }, { l:accept(0.5) })
      assert.is_true(open_fds(7))             -- the listener, 3 peers, 3 pending
      l:close()
      assert.is_true(open_fds(3))
      for _, s in ipairs(silent) do
        assert.matches("^#CHALLENGE#", s:recv_bytes(5))
        assert.are.same({ nil, "closed" }, { s:recv_bytes(5) })
      end
      l = mp.Listener(new_address(), { authkey = "k" })
      silent[4] = raw_connect(l.address)
      assert.are.same({ nil, "timeout" }, { l:accept(0.5) })
      assert.is_true(open_fds(6))
      l = nil   -- luacheck: ignore 311
      collectgarbage("restart")
      collectgarbage(); collectgarbage()
      assert.is_true(open_fds(4))
      for _, s in ipairs(silent) do s:close() end
      assert.is_true(open_fds(0))
    end)

    it("raises on a bad timeout", function()
      local l = mp.Listener(new_address(), { authkey = "k" })
      for _, bad in ipairs({ -1, "x", 0 / 0 }) do
        assert.error_matches(function() l:accept(bad) end,
                             "bad argument #1 to 'accept' (timeout must be a number >= 0)", 1, true)
      end
      l:close()
      assert.has_error(function() l:accept(0) end, "listener is closed")
    end)
  end)
end

-- Ctrl-C (see H.interrupt_wait): accept, and the authkey handshake after
-- it, give way to it at once.
describe("SIGINT interrupts a blocked wait", function()
  H.leakcheck()
  local interrupt = H.interrupt_wait

  it("in Listener:accept()", function()
    local l = mp.Listener("127.0.0.1:0")
    local code = interrupt(function(ready) ready() l:accept() end)
    assert.are.equal(1, code)
    l:close()
  end)

  it("in the authkey handshake of accept, which does not take it for a failed handshake", function()
    local l = mp.Listener("127.0.0.1:0", { authkey = "k" })
    local accepting <close> = mp.Event()
    local p = H.start(function()
      accepting:set()
      local ok, err = pcall(l.accept, l)
      return (not ok and err == "interrupted!") and 0 or 7
    end)
    assert.is_true(accepting:wait(10))
    local c = core.connect(l.address:match("^(.*):(%d+)$"))   -- says nothing
    H.sleep(0.2)
    p:interrupt()
    assert.are.equal(0, H.finish(p, 10))
    c:close(); l:close()
  end)
end)
