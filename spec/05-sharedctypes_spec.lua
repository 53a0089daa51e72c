-- Value, Array, RawValue, RawArray: types and codes, conversions and
-- ranges, bounds, locks, lifecycle, sharing across processes and as handles.
local H = require "helpers"
local mp = require "multiprocessing"

local spawn, join = H.start, H.finish   -- a child running fn(...); join, kill, close

describe("Value", function()
  H.leakcheck()

  it("rejects bad types, initial values and options", function()
    assert.has_error(function() mp.Value() end)
    assert.has_error(function() mp.Value(5) end)
    assert.has_error(function() mp.Value("int128") end)
    assert.has_error(function() mp.Value("u") end)
    assert.has_error(function() mp.Value("int32", "x") end)
    assert.has_error(function() mp.Value("int32", 1.5) end)
    assert.has_error(function() mp.Value("int32", 1, 5) end)
    assert.has_error(function() mp.Value("int32", 1, { lokc = true }) end)
    assert.has_error(function() mp.Value("int32", 1, { lock = 5 }) end)
    assert.has_error(function() mp.Value("int32", 1, { lock = mp.Event() }) end)
    assert.has_error(function() mp.RawValue("bool", 1) end)
  end)

  it("names the argument in its messages", function()
    local ok, err = pcall(mp.Value, "int8", 300)
    assert.is_false(ok)
    assert.truthy(tostring(err):find("bad argument #2 to 'Value'", 1, true))
    assert.truthy(tostring(err):find("int8", 1, true))
    ok, err = pcall(mp.Value, "nope")
    assert.is_false(ok)
    assert.truthy(tostring(err):find("bad argument #1 to 'Value'", 1, true))
  end)

  it("starts at zero and reads back what was written, for every type", function()
    local cases = {
      { "int8", -128, 127 }, { "b", -5, 5 },
      { "uint8", 0, 255 }, { "B", 0, 200 },
      { "int16", -32768, 32767 }, { "h", 1, -1 },
      { "uint16", 0, 65535 }, { "H", 7, 65535 },
      { "int32", -2147483648, 2147483647 }, { "i", 3, -3 },
      { "uint32", 0, 4294967295 }, { "I", 1, 4294967295 },
      { "int64", math.mininteger, math.maxinteger }, { "l", 1, -1 }, { "q", 2, -2 },
      { "uint64", 0, 12345 }, { "L", 0, 1 }, { "Q", 0, 2 },
      { "double", 0.5, -1e300 }, { "d", 0.25, math.huge },
      { "float", 0.5, -2.0 }, { "f", 0.25, 1024.0 },
    }
    for _, c in ipairs(cases) do
      local v = mp.RawValue(c[1])
      assert.are.equal(0, v.value)
      v.value = c[2]
      assert.are.equal(c[2], v.value)
      v.value = c[3]
      assert.are.equal(c[3], v.value)
      v:close()
    end
  end)

  it("keeps integer types integers and float types floats", function()
    local i <close> = mp.RawValue("int32", 7.0)
    assert.are.equal("integer", math.type(i.value))
    local d <close> = mp.RawValue("double", 7)
    assert.are.equal("float", math.type(d.value))
  end)

  it("rounds a float to single precision", function()
    local f <close> = mp.RawValue("float", 0.1)
    assert.are_not.equal(0.1, f.value)
    assert.is_true(math.abs(f.value - 0.1) < 1e-7)
  end)

  it("refuses values out of the type's range", function()
    local v <close> = mp.RawValue("uint8")
    assert.has_error(function() v.value = 256 end)
    assert.has_error(function() v.value = -1 end)
    assert.has_error(function() v.value = "1" end)
    local s <close> = mp.RawValue("int16")
    assert.has_error(function() s.value = 40000 end)
    local u <close> = mp.RawValue("uint32")
    assert.has_error(function() u.value = -1 end)
    local d <close> = mp.RawValue("double")
    assert.has_error(function() d.value = "1.5" end)
    assert.has_error(function() d.value = true end)
    assert.are.equal(0, v.value + s.value + u.value + d.value)
  end)

  it("wraps uint64 past 2^63 as Lua integers do", function()
    local v <close> = mp.RawValue("uint64", -1)
    assert.are.equal(-1, v.value)
    assert.are.equal("18446744073709551615", string.format("%u", v.value))
  end)

  it("stores bool as a boolean and char as a 1-byte string", function()
    local b <close> = mp.RawValue("bool")
    assert.is_false(b.value)
    b.value = true
    assert.is_true(b.value)
    assert.has_error(function() b.value = 1 end)
    local c <close> = mp.RawValue("c", "x")
    assert.are.equal("x", c.value)
    c.value = 65
    assert.are.equal("A", c.value)
    assert.has_error(function() c.value = "xy" end)
    assert.has_error(function() c.value = 256 end)
    local z <close> = mp.RawValue("char")
    assert.are.equal("\0", z.value)
  end)

  it("makes an RLock by default, none with lock=false, and uses a given lock", function()
    local v <close> = mp.Value("int32", 1)
    local l = v:get_lock()
    assert.are.equal("multiprocessing.RLock", getmetatable(l).__name)
    local r <close> = mp.Value("int32", 1, { lock = false })
    assert.has_error(function() r:get_lock() end)
    local raw <close> = mp.RawValue("int32")
    assert.has_error(function() raw:get_lock() end)
    local given <close> = mp.Lock()
    local g <close> = mp.Value("double", 0, { lock = given })
    assert.are.equal(given, g:get_lock())
    g:get_lock():acquire()
    assert.is_true(given:locked())
    g:get_lock():release()
    local tv <close> = mp.Value("int32", 0, { lock = true })
    assert.are.equal("multiprocessing.RLock", getmetatable(tv:get_lock()).__name)
    l:close()
  end)

  it("keeps two Values apart when one is given the other's lock", function()
    local a <close> = mp.Value("int64", 1)
    local b <close> = mp.Value("double", 2.5, { lock = a:get_lock() })
    assert.are.equal(a:get_lock(), b:get_lock())
    b.value = -7.25
    a.value = 99
    assert.are.equal(99, a.value)
    assert.are.equal(-7.25, b.value)
    b:get_lock():acquire()
    assert.is_true(a:get_lock():_is_mine())
    b:get_lock():release()
  end)

  it("keeps working after its lock is closed (its element lives beside the lock word)", function()
    local v <close> = mp.Value("double", 1.25)
    v:get_lock():close()
    v.value = 2.5
    assert.are.equal(2.5, v.value)
    assert.has_error(function() v:get_lock():acquire() end, "RLock is closed")
  end)

  it("refuses other fields", function()
    local v <close> = mp.RawValue("int32")
    assert.has_error(function() v.valeu = 1 end)
    assert.is_nil(v.valeu)
  end)

  it("names itself and its state; closes twice; raises after close", function()
    local v = mp.RawValue("int32", 42)
    assert.are.equal("<Value(int32, 42)>", tostring(v))
    assert.are.same({ "i", "int32" }, { v:typecode() })
    v:close()
    v:close()
    assert.are.equal("<Value(closed)>", tostring(v))
    assert.has_error(function() return v.value end, "Value is closed")
    assert.has_error(function() v.value = 1 end, "Value is closed")
  end)

  it("is shared with a child process", function()
    local v <close> = mp.Value("double", 1.5)
    local p = spawn(function() v.value = v.value * 2 end)
    assert.are.equal(0, join(p))
    assert.are.equal(3.0, v.value)
  end)

  it("ends at 40,000 after 4 processes x 10,000 locked increments", function()
    local v <close> = mp.Value("int64", 0)
    local ps = {}
    for i = 1, 4 do
      ps[i] = spawn(function()
        local lock = v:get_lock()
        for _ = 1, 10000 do
          lock:acquire()
          v.value = v.value + 1
          lock:release()
        end
      end)
    end
    for i = 1, 4 do assert.are.equal(0, join(ps[i])) end
    assert.are.equal(40000, v.value)
  end)
end)

describe("Array", function()
  H.leakcheck()

  it("rejects bad sizes and lists", function()
    assert.has_error(function() mp.Array("int32") end)
    assert.has_error(function() mp.Array("int32", -1) end)
    assert.has_error(function() mp.Array("int32", 2.5) end)
    assert.has_error(function() mp.Array("int32", "abc") end)
    assert.has_error(function() mp.Array("int32", { 1, "x" }) end)
    assert.has_error(function() mp.Array("uint8", { 1, 256 }) end)
    assert.has_error(function() mp.RawArray("zz", 3) end)
    local ok, err = pcall(mp.Array, "int8", { 1, 2, 300 })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("item 3", 1, true))
  end)

  it("names the call and why for a size too large for shared memory", function()
    for _, f in ipairs({ mp.Array, mp.RawArray }) do
      local ok, err = pcall(function() return f("i", 1 << 50) end)
      assert.is_false(ok)
      err = tostring(err)
      assert.truthy(err:find("to '" .. (f == mp.Array and "Array" or "RawArray")
                             .. "' (size 1125899906842624 too large", 1, true), err)
      assert.truthy(err:find("items of int32", 1, true), err)
      assert.is_nil(err:find("shared_new", 1, true))
      assert.is_nil(err:find("sharedctypes.lua", 1, true))
    end
  end)

  it("is 1-based with bounds checks", function()
    local a <close> = mp.Array("int32", 3)
    assert.are.equal(3, #a)
    assert.are.same({ 0, 0, 0 }, a:totable())
    a[1] = 10; a[3] = 30
    assert.are.equal(10, a[1])
    assert.are.equal(30, a[3])
    assert.has_error(function() return a[0] end)
    assert.has_error(function() return a[4] end)
    assert.has_error(function() a[0] = 1 end)
    assert.has_error(function() a[4] = 1 end)
    assert.has_error(function() return a[1.5] end)
    assert.has_error(function() a.x = 1 end)
    assert.has_error(function() a[2] = "x" end)
    assert.are.same({ 10, 0, 30 }, a:totable())
  end)

  it("is made from a list and gives it back with totable", function()
    local a <close> = mp.Array("d", { 1.5, 2, -3 })
    assert.are.same({ 1.5, 2.0, -3.0 }, a:totable())
    assert.are.same({ 2.0, -3.0 }, a:totable(2))
    assert.are.same({ 1.5, 2.0 }, a:totable(1, 2))
    assert.are.same({}, a:totable(3, 2))
    assert.has_error(function() a:totable(0) end)
    assert.has_error(function() a:totable(1, 4) end)
  end)

  it("accepts an empty array and a string of chars", function()
    local e <close> = mp.RawArray("int16", 0)
    assert.are.equal(0, #e)
    assert.are.same({}, e:totable())
    assert.has_error(function() return e[1] end)
    local c <close> = mp.RawArray("c", "hey")
    assert.are.equal(3, #c)
    assert.are.same({ "h", "e", "y" }, c:totable())
  end)

  it("has a lock unless told otherwise, and uses a given lock", function()
    local a <close> = mp.Array("int32", 2)
    assert.are.equal("multiprocessing.RLock", getmetatable(a:get_lock()).__name)
    local r <close> = mp.RawArray("int32", 2)
    assert.has_error(function() r:get_lock() end)
    local n <close> = mp.Array("int32", 2, { lock = false })
    assert.has_error(function() n:get_lock() end)
    local l <close> = mp.RLock()
    local g <close> = mp.Array("int32", 2, { lock = l })
    assert.are.equal(l, g:get_lock())
  end)

  it("names itself; closes twice; raises after close", function()
    local a = mp.RawArray("uint16", 4)
    assert.are.equal("<Array(uint16, 4)>", tostring(a))
    a:close()
    a:close()
    assert.are.equal("<Array(closed)>", tostring(a))
    assert.has_error(function() return a[1] end, "Array is closed")
    assert.has_error(function() return #a end, "Array is closed")
    assert.has_error(function() a:totable() end, "Array is closed")
  end)

  it("is shared with child processes", function()
    local a <close> = mp.Array("int32", 4)
    local ps = {}
    for i = 1, 4 do ps[i] = spawn(function() a[i] = i * i end) end
    for i = 1, 4 do assert.are.equal(0, join(ps[i])) end
    assert.are.same({ 1, 4, 9, 16 }, a:totable())
  end)
end)

describe("Value and Array as handles", function()
  H.leakcheck()

  it("travel through a Pipe with their lock", function()
    local a, b = mp.Pipe()
    local v <close> = mp.Value("int32", 5)
    local arr <close> = mp.Array("double", { 1, 2 }, { lock = false })
    a:send({ v, arr })
    local t = b:recv(5)
    assert.are.equal(5, t[1].value)
    t[1].value = 6
    assert.are.equal(6, v.value)
    t[1]:get_lock():acquire()
    assert.is_true(v:get_lock():locked())
    t[1]:get_lock():release()
    assert.are.same({ 1.0, 2.0 }, t[2]:totable())
    assert.has_error(function() t[2]:get_lock() end)
    t[1]:get_lock():close()
    t[1]:close(); t[2]:close()
    v:get_lock():close()
    a:close(); b:close()
  end)
end)

describe("shared memory segments", function()
  H.leakcheck()

  -- A child that holds obj's segment (fd) opens it through /proc with
  -- O_TRUNC, as a hostile process could, then reads: the segment must have
  -- kept its size (exit 0). Unsealed, the truncation worked and the read
  -- died of SIGBUS (exit -7): in a child, so busted itself survives.
  local function truncate_then_read(fd, read)
    return join(spawn(function()
      local f = io.open("/proc/self/fd/" .. fd, "w")
      if f then f:close() end
      local ok = read()
      return f == nil and ok and 0 or 3
    end), 10)
  end

  it("cannot be truncated by a process that holds them (regression: SIGBUS in " ..
     "the next read of an Array, a Value or a Lock)", function()
    local a <close> = mp.RawArray("int32", { 11, 22, 33 })
    assert.are.equal(0, truncate_then_read(a:fileno(), function() return a[3] == 33 end))
    assert.are.same({ 11, 22, 33 }, a:totable())
    local v <close> = mp.Value("double", 2.5)    -- its element is in its lock's segment
    assert.are.equal(0, truncate_then_read(v:fileno(), function() return v.value == 2.5 end))
    assert.are.equal(2.5, v.value)
    v:get_lock():close()
    local lock <close> = mp.Lock()
    assert.are.equal(0, truncate_then_read(lock:fileno(), function()
      return lock:acquire(0) and (lock:release() or true)
    end))
    assert.is_true(lock:acquire(0))
    lock:release()
  end)

  it("are refused as a received handle when not sealed against shrinking", function()
    local a <close> = mp.RawArray("int32", { 1, 2, 3 })
    local s, fds = mp.dumps(a)
    -- a forged segment: the same bytes in a memfd that may still shrink
    local forged <close> = H.forge_unsealed(fds[1])
    local ok, err = pcall(mp.loads, s, { fds = { forged:fileno() } })
    assert.is_false(ok)
    assert.is_true(mp.SerializationError:is(err))
    assert.truthy(err.message:find("not sealed against shrinking", 1, true), err.message)
    -- the same bytes in the sealed segment are accepted
    local b <close> = mp.loads(s, { fds = fds })
    assert.are.same({ 1, 2, 3 }, b:totable())
  end)

  it("are refused as a received handle when smaller than their header says", function()
    local a <close> = mp.RawArray("int32", 4)
    local s, fds = mp.dumps(a)
    -- the header (csrc/sharedctypes.c: magic, code, esize, isarray, then
    -- the count as a u64 at byte 16) now claims a million elements
    local f = assert(io.open("/proc/self/fd/" .. fds[1], "r+b"))
    f:seek("set", 16)
    f:write(string.pack("<I8", 1000000))
    f:close()
    local ok, err = pcall(mp.loads, s, { fds = fds })
    assert.is_false(ok)
    assert.is_true(mp.SerializationError:is(err))
    assert.truthy(err.message:find("Array", 1, true), err.message)
    a[4] = 9                                     -- the sender's view is its own
    assert.are.equal(9, a[4])
  end)
end)

describe("shared objects under the spawn start method", function()
  H.leakcheck()

  it("reach a spawned child as handles to the same memory", function()
    local script = H.tmpname("spawn.lua")
    local f = assert(io.open(script, "w"))
    f:write([[
local mp = require "multiprocessing"
local function worker(lock, v, arr, ev, b, sem)
  local ok = lock:acquire(10)
  v.value = v.value + 10
  lock:release()
  arr[2] = 42
  sem:release()
  if not b:wait(10) then os.exit(3) end
  ev:set()
  os.exit(ok and 0 or 2)
end
if mp.is_main() then
  local ctx = mp.get_context("spawn")
  local lock, v, arr, ev = mp.Lock(), mp.Value("int32", 1), mp.Array("double", 3), mp.Event()
  local count = mp.RawValue("int32", 0)
  local b, sem = mp.Barrier(2, function() count.value = count.value + 1 end, 10), mp.Semaphore(0)
  local p = ctx.Process{ target = worker, args = { lock, v, arr, ev, b, sem } }
  p:start()
  local idx = b:wait(10)
  print("barrier", idx ~= nil, count.value)
  print("event", ev:wait(10), sem:acquire(10))
  print("joined", p:join(20), v.value, arr[2], v:get_lock():locked())
end
]])
    f:close()
    local cmd = ("LUA_PATH=%q LUA_CPATH=%q timeout 60 lua5.4 %s 2>&1"):format(
      package.path, package.cpath, script)
    local p = io.popen(cmd)
    local out = p:read("a")
    p:close()
    os.remove(script)
    assert.truthy(out:find("barrier\ttrue\t1", 1, false), out)
    assert.truthy(out:find("event\ttrue\ttrue", 1, true), out)
    assert.truthy(out:find("joined\t0\t11\t42.0\tfalse", 1, true), out)
  end)
end)
