-- Listener and Client over TCP and Unix sockets, with and without authkey.
local H = require "helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local function hex(s)
  return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

describe("HMAC-SHA256", function()
  it("gives the known digests", function()
    assert.are.equal("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
                     hex(core.sha256("abc")))
    assert.are.equal("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                     hex(core.sha256("")))
    -- RFC 4231, test case 2
    assert.are.equal("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
                     hex(core.hmac_sha256("Jefe", "what do ya want for nothing?")))
    -- a key longer than the block is hashed first (RFC 4231, test case 6)
    assert.are.equal("60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
                     hex(core.hmac_sha256(string.rep("\170", 131),
                       "Test Using Larger Than Block-Size Key - Hash Key First")))
  end)

  it("draws random challenges", function()
    assert.are.equal(32, #core.random_bytes(32))
    assert.are_not.equal(core.random_bytes(32), core.random_bytes(32))
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

  it("raise when nothing listens", function()
    local l = mp.Listener("127.0.0.1:0")
    local addr = l.address
    l:close()
    assert.has_error(function() mp.Client(addr) end)
    assert.has_error(function() mp.Client(H.tmpname("nosock")) end)
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

-- Ctrl-C under lua5.4: SIGINT sets a hook that raises "interrupted!";
-- accept, and the authkey handshake after it, let it run at once.
describe("SIGINT interrupts a blocked wait", function()
  H.leakcheck()
  local interrupt, BOUND = H.interrupt_wait, H.INTERRUPT_BOUND

  it("in Listener:accept()", function()
    local l = mp.Listener("127.0.0.1:0")
    local code, took = interrupt(function(ready) ready() l:accept() end)
    assert.are.equal(1, code)
    assert.is_true(took < BOUND, took)
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
