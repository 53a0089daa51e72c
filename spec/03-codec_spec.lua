-- The codec: mp.dumps / mp.loads / mp.register, handles, functions with
-- upvalues, error paths and hostile input.
local H = require "helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local dumps, loads = mp.dumps, mp.loads

local function rt(v, opts) return loads(dumps(v), opts) end

-- error object of type SerializationError whose message matches pattern
local function ser_error(f, pattern)
  local ok, err = pcall(f)
  assert.is_false(ok, "expected an error")
  assert.are.equal("table", type(err), tostring(err))
  assert.are.equal("SerializationError", err.type, tostring(err.message))
  assert.is_true(mp.SerializationError:is(err))
  if pattern then
    assert.is_truthy(err.message:find(pattern, 1, true),
      "message '" .. err.message .. "' lacks '" .. pattern .. "'")
  end
  return err
end

describe("codec environment", function()
  it("runs under Lua 5.4", function()
    assert.are.equal("Lua 5.4", _VERSION)
  end)

  it("exports dumps, loads and register", function()
    assert.are.equal("function", type(mp.dumps))
    assert.are.equal("function", type(mp.loads))
    assert.are.equal("function", type(mp.register))
  end)
end)

describe("codec arguments", function()
  it("dumps needs a value", function()
    assert.has_error(function() dumps() end)
  end)

  it("loads checks its arguments and options", function()
    assert.has_error(function() loads() end)
    assert.has_error(function() loads({}) end)
    assert.has_error(function() loads(dumps(1), 5) end)
    assert.has_error(function() loads(dumps(1), {function_s = false}) end)
    assert.has_error(function() loads(dumps(1), {functions = "no"}) end)
    assert.has_error(function() loads(dumps(1), {fds = 3}) end)
    assert.has_error(function() loads(dumps(1), {fds = {-1}}) end)
    assert.has_error(function() loads(dumps(1), {fds = {"x"}}) end)
  end)

  it("register checks its arguments", function()
    assert.has_error(function() mp.register() end)
    assert.has_error(function() mp.register("", {}) end)
    assert.has_error(function() mp.register("spec.x", 5) end)
    assert.has_error(function() mp.register({}, {}) end)
  end)
end)

describe("codec values", function()
  it("keeps nil and booleans", function()
    assert.is_nil(rt(nil))
    assert.are.equal(true, rt(true))
    assert.are.equal(false, rt(false))
  end)

  it("keeps integers exactly, subtype included", function()
    for _, v in ipairs{ 0, 1, 127, 128, 255, 256, -1, -64, -65, -128, 1 << 31,
                        -(1 << 31), (1 << 53) + 1, math.maxinteger,
                        math.mininteger, math.maxinteger - 1,
                        math.mininteger + 1 } do
      local r = rt(v)
      assert.are.equal(v, r)
      assert.are.equal("integer", math.type(r))
    end
  end)

  it("keeps floats exactly: -0.0, inf, nan, integral floats", function()
    for _, v in ipairs{ 0.0, 1.0, -1.0, 1.5, 0.1, 1e308, 5e-324, 2^53, 2^63,
                        -2^63, 1 / 0, -1 / 0, math.pi, 127.0 } do
      local r = rt(v)
      assert.are.equal(v, r)
      assert.are.equal("float", math.type(r))
      assert.are.equal(string.pack("<d", v), string.pack("<d", r))
    end
    local z = rt(-0.0)
    assert.are.equal(-1 / 0, 1 / z)
    assert.are.equal("float", math.type(z))
    local nan = rt(0 / 0)
    assert.is_true(nan ~= nan)
    assert.are.equal("float", math.type(nan))
  end)

  it("keeps strings with any bytes", function()
    local all = {}
    for i = 0, 255 do all[#all + 1] = string.char(i) end
    all = table.concat(all)
    for _, s in ipairs{ "", "\0", "a\0b", all, all:reverse(),
                        string.rep("x", 31), string.rep("y", 32),
                        string.rep("z", 127), string.rep("w", 128),
                        string.rep("\0\255", 100000) } do
      assert.are.equal(s, rt(s))
    end
  end)

  it("keeps nested tables with any key types", function()
    local key = { "k" }
    local v = { 1, 2.5, "three", { 4, { 5, { 6 } } },
                x = 1, [true] = "t", [false] = "f", [1.5] = "f1.5",
                [-7] = "neg", [0] = "zero", [math.maxinteger] = "max",
                ["with space"] = { ["\0"] = "nul" }, [key] = "tablekey" }
    local r = rt(v)
    assert.are.same({ 1, 2.5, "three", { 4, { 5, { 6 } } } },
                    { r[1], r[2], r[3], r[4] })
    assert.are.equal(1, r.x)
    assert.are.equal("t", r[true]); assert.are.equal("f", r[false])
    assert.are.equal("f1.5", r[1.5]); assert.are.equal("neg", r[-7])
    assert.are.equal("zero", r[0]); assert.are.equal("max", r[math.maxinteger])
    assert.are.equal("nul", r["with space"]["\0"])
    local found
    for k, val in pairs(r) do
      if type(k) == "table" then found = { k, val } end
    end
    assert.are.same({ { "k" }, "tablekey" }, found)
  end)

  it("keeps arrays with holes and the integer/float subtype of elements", function()
    local r = rt({ 1, nil, 3, nil, 5.0 })
    assert.are.equal(1, r[1]); assert.is_nil(r[2]); assert.are.equal(3, r[3])
    assert.is_nil(r[4]); assert.are.equal("float", math.type(r[5]))
    local big = {}
    for i = 1, 10000 do big[i] = i % 3 == 0 and i + 0.5 or i end
    assert.are.same(big, rt(big))
  end)

  it("keeps shared references and cycles", function()
    local shared = { "s" }
    local a = { shared, shared, child = {} }
    a.self = a
    a.child.parent = a
    a[shared] = shared
    local r = rt(a)
    assert.are.equal(r[1], r[2])
    assert.are.equal(r, r.self)
    assert.are.equal(r, r.child.parent)
    assert.are.equal(r[1], r[r[1]])
    assert.are.equal("s", r[1][1])
  end)

  it("keeps a table nested 200 deep and refuses 201", function()
    local function nest(n)
      local t = { leaf = true }
      for _ = 2, n do t = { t } end
      return t
    end
    local r = rt(nest(200))
    for _ = 2, 200 do r = r[1] end
    assert.is_true(r.leaf)
    ser_error(function() dumps(nest(201)) end, "nested more than 200")
    -- and a hand-made message nested 201 deep is refused by the decoder
    local msg = "\1\0" .. string.rep("\6\1\0\0\0\0\0\0\0", 201)
    ser_error(function() loads(msg) end, "nested too deep")
  end)

  it("refuses values that cannot be serialized, naming the path", function()
    local e = ser_error(function() dumps({ 1, { sock = io.stdout } }) end)
    assert.are.equal("value[2].sock: cannot serialize userdata (FILE*)", e.message)
    e = ser_error(function() dumps({ 1, { sock = io.stdout } }, "args") end)
    assert.are.equal("args[2].sock: cannot serialize userdata (FILE*)", e.message)
    ser_error(function() dumps(io.stdout) end, "value: cannot serialize userdata (FILE*)")
    ser_error(function() dumps({ ["a b"] = { coroutine.create(print) } }) end,
              'value["a b"][1]: cannot serialize thread')
    ser_error(function() dumps({ [io.stdout] = 1 }) end,
              "value[<key>]: cannot serialize userdata (FILE*)")
    ser_error(function() dumps({ [true] = { [2.5] = io.stderr } }) end,
              "value[true][2.5]: cannot serialize userdata")
    local f = io.stdout
    ser_error(function() dumps({ fn = function() return f end }) end,
              "value.fn(upvalue f): cannot serialize userdata (FILE*)")
  end)
end)

describe("codec classes", function()
  local Point = { __name = "spec.Point" }
  Point.__index = Point
  function Point:norm1() return math.abs(self.x) + math.abs(self.y) end
  mp.register("spec.Point", Point)

  it("gives a registered class its metatable back", function()
    local p = setmetatable({ x = 3, y = -4 }, Point)
    local r = rt({ p, p })
    assert.are.equal(Point, getmetatable(r[1]))
    assert.are.equal(r[1], r[2])
    assert.are.equal(7, r[1]:norm1())
  end)

  it("sends a registered class itself by its name, as a value and as an upvalue", function()
    local r = rt({ cls = Point, again = Point })
    assert.are.equal(Point, r.cls)                -- the receiver's own, not a copy
    assert.are.equal(Point, r.again)
    local function make(x) return setmetatable({ x = x, y = 0 }, Point) end
    local make2 = rt(make)
    assert.are.equal(Point, getmetatable(make2(5)))
    assert.are.equal(5, rt(make2(5)):norm1())     -- and its objects travel again
    -- TBL_REG "spec.Nope": a name the receiver has not registered
    local msg = "\1\0\15" .. string.char(0x40 + 9) .. "spec.Nope"
    ser_error(function() loads(msg) end, "table 'spec.Nope' is not registered")
  end)

  it("refuses a table with an unregistered metatable", function()
    local mt = { __name = "spec.Unknown" }
    local e = ser_error(function()
      dumps({ list = { setmetatable({}, mt) } })
    end, "value.list[1]: cannot serialize table with an unregistered metatable")
    assert.is_truthy(e.message:find("spec.Unknown", 1, true))
  end)

  it("refuses a class name that the receiver has not registered", function()
    -- TABLE_MT "spec.Nope" {}
    local msg = "\1\0\7" .. string.char(0x40 + 9) .. "spec.Nope" .. "\0\0\0\0\0\0\0\0"
    ser_error(function() loads(msg) end, "class 'spec.Nope' is not registered")
  end)

  it("raises when a name is registered twice with different values", function()
    local A, B = {}, {}
    assert.are.equal(A, mp.register("spec.Twice", A))
    assert.are.equal(A, mp.register("spec.Twice", A))   -- same value: fine
    assert.has_error(function() mp.register("spec.Twice", B) end)
    assert.has_error(function() mp.register("spec.Twice.alias", A) end)
  end)
end)

describe("codec functions", function()
  it("copies a closure over closures", function()
    local base = 10
    local function add(x) return x + base end
    local function twice(x) return add(add(x)) end
    local f = rt(twice)
    assert.are_not.equal(twice, f)
    assert.are.equal(21, f(1))
  end)

  it("sends a closure's current upvalues each time (its bytecode is cached)", function()
    local n = 1
    local function get() return n end
    assert.are.equal(1, rt(get)())
    n = 2
    assert.are.equal(2, rt(get)())
    local other = load(string.dump(get))   -- same code, another closure
    debug.setupvalue(other, 1, 40)
    assert.are.equal(40, rt(other)())
  end)

  it("copies a recursive local function", function()
    local function fact(n) if n <= 1 then return 1 end return n * fact(n - 1) end
    local f = rt(fact)
    assert.are.equal(3628800, f(10))
    local _, up = debug.getupvalue(f, 1)
    assert.are.equal(f, up)
  end)

  it("keeps an upvalue shared by two functions shared", function()
    local count = 0
    local function inc() count = count + 1; return count end
    local function get() return count end
    local r = rt({ inc = inc, get = get })
    r.inc(); r.inc()
    assert.are.equal(2, r.get())
    assert.are.equal(0, count)         -- a copy: the original is untouched
    assert.are.equal(0, get())
  end)

  it("keeps sharing between closures made by one factory and tables", function()
    local function counter()
      local n = 0
      return function() n = n + 1; return n end, function() return n end
    end
    local i1, g1 = counter()
    local i2, g2 = counter()
    local data = { items = { 1, 2 } }
    local function peek() return data end
    local r = rt({ i1, g1, i2, g2, peek, data })
    r[1](); r[1](); r[3]()
    assert.are.equal(2, r[2]()); assert.are.equal(1, r[4]())
    assert.are.equal(r[6], r[5]())
  end)

  it("gives an _ENV upvalue the receiver's globals", function()
    local function usesglobal() return tostring(123) .. type(nil) end
    local f = rt(usesglobal)
    assert.are.equal("123nil", f())
    local _, env = debug.getupvalue(f, 1)
    assert.are.equal(_G, env)
  end)

  it("sends a module table by its name", function()
    local function fmt(x) return string.format("%05d", x) end
    local utf = utf8
    local function clen(s) return utf.len(s) end
    local f, g = rt(fmt), rt(clen)
    assert.are.equal("00042", f(42))
    assert.are.equal(2, g("é!"))
    local _, up = debug.getupvalue(g, 1)
    assert.are.equal(utf8, up)
    assert.are.equal(string, rt(string))
  end)

  it("sends a module function by name, keeping the module's state", function()
    local mod = { n = 0 }
    function mod.bump() mod.n = mod.n + 1; return mod.n end
    package.loaded["spec.codec.mod"] = mod
    local f = rt({ mod.bump })[1]
    assert.are.equal(mod.bump, f)
    f(); f()
    assert.are.equal(2, mod.n)
    -- a function replaced in its module is no longer sent by name, and the
    -- new one is (the map is rebuilt when a cached entry turns out stale)
    local old = mod.bump
    function mod.bump() return "new" end
    local copy = rt(old)
    assert.are_not.equal(old, copy)
    assert.are.equal(3, copy())
    assert.are.equal(mod.bump, rt(mod.bump))
    package.loaded["spec.codec.mod"] = nil
  end)

  it("sends a registered function by name", function()
    local calls = 0
    local function hook() calls = calls + 1 end
    mp.register("spec.hook", hook)
    local f = rt(hook)
    assert.are.equal(hook, f)
    local msg = "\1\0\11" .. string.char(0x40 + 9) .. "spec.none"
    ser_error(function() loads(msg) end, "function 'spec.none' is not registered")
  end)

  it("sends C functions by name only", function()
    assert.are.equal(string.format, rt(string.format))
    assert.are.equal(print, rt(print))
    assert.are.equal(table.concat, rt({ table.concat })[1])
    local wrapped = coroutine.wrap(function() end)   -- a C closure, in no module
    ser_error(function() dumps({ cb = wrapped }) end,
              "value.cb: cannot serialize C function")
  end)

  it("requires a module by name only when functions are allowed", function()
    package.preload["spec.codec.lazy"] = function() return { lazy = true } end
    -- MODULE "spec.codec.lazy", made by hand: the module is not loaded here
    local name = "spec.codec.lazy"
    local msg = "\1\0\10" .. string.char(0x40 + #name) .. name
    ser_error(function() loads(msg, { functions = false }) end,
              "module 'spec.codec.lazy' is not loaded")
    assert.is_nil(package.loaded["spec.codec.lazy"])
    assert.is_true(loads(msg).lazy)
    assert.are.equal(package.loaded["spec.codec.lazy"], loads(msg))
    package.loaded["spec.codec.lazy"] = nil
    package.preload["spec.codec.lazy"] = nil
    ser_error(function() loads("\1\0\10" .. string.char(0x40 + 12) .. "spec.nothing") end,
              "module 'spec.nothing' cannot be loaded")
  end)

  it("refuses functions with functions=false", function()
    local function lf() return 1 end
    for _, f in ipairs{ lf, string.format } do
      local s = dumps({ f })
      ser_error(function() loads(s, { functions = false }) end,
                "functions are refused")
    end
    assert.are.same({ 1, "x" }, loads(dumps({ 1, "x" }), { functions = false }))
    assert.are.equal(1, loads(dumps(lf), { functions = true })())
  end)
end)

describe("codec handles", function()
  local Thing = {}
  Thing.__index = Thing
  local rebuilt = 0
  Thing.__mp_reduce = function(self) return "spec.Thing", { id = self.id, tag = self.tag } end
  core.register_handle("spec.Thing", function(state)
    rebuilt = rebuilt + 1
    return setmetatable({ id = state.id, tag = state.tag, copy = true }, Thing)
  end)

  it("rebuilds a handle from its kind and state, once per object", function()
    local t = setmetatable({ id = 7, tag = "seven", secret = io.stdout }, Thing)
    local before = rebuilt
    local s, fds = dumps({ t, t, other = setmetatable({ id = 8 }, Thing) })
    assert.is_nil(fds)
    local r = loads(s)
    assert.are.equal(2, rebuilt - before)
    assert.are.equal(r[1], r[2])
    assert.are.equal(7, r[1].id); assert.is_true(r[1].copy)
    assert.are.equal(8, r.other.id)
    assert.are.equal(Thing, getmetatable(r[1]))
  end)

  it("lets a __mp_reduce call mp.dumps itself", function()
    local Outer = { __mp_reduce = function(self)
      return "spec.Thing", { id = #dumps({ self.inner, "nested" }), tag = "outer" }
    end }
    local v = { setmetatable({ inner = { 1, 2, 3 } }, Outer), "after" }
    local r = loads(dumps(v))
    assert.are.equal("outer", r[1].tag)
    assert.is_true(r[1].id > 0)
    assert.are.equal("after", r[2])
    assert.are.same({ "x", { 1 } }, loads(dumps({ "x", { 1 } })))
  end)

  it("names the handle's state in error paths", function()
    local t = setmetatable({ id = io.stdout }, Thing)
    ser_error(function() dumps({ h = t }) end,
              "value.h(state of spec.Thing).id: cannot serialize userdata")
  end)

  it("lists the kinds registered, the C classes' and those made in Lua", function()
    local kinds = core._test.handle_kinds()
    local set = {}
    for i, k in ipairs(kinds) do
      set[k] = true
      if i > 1 then assert.is_true(kinds[i - 1] < k) end
    end
    for _, k in ipairs({ "Connection", "FdBox", "PoolWorker", "Queue", "Value", "Array",
                         "Lock", "RLock", "Semaphore", "BoundedSemaphore", "Condition",
                         "Event", "Barrier", "spec.Thing" }) do
      assert.is_true(set[k], k)
    end
    assert.is_nil(set["spec.Unknown.kind"])
  end)

  it("refuses an unknown handle kind", function()
    local Other = { __mp_reduce = function() return "spec.Unknown.kind", 1 end }
    local s = dumps(setmetatable({}, Other))
    ser_error(function() loads(s) end, "unknown handle kind 'spec.Unknown.kind'")
  end)

  it("refuses a rebuild that returns nil and a reduce that returns no kind", function()
    core.register_handle("spec.Nil", function() return nil end)
    local s = dumps(setmetatable({}, { __mp_reduce = function() return "spec.Nil", 0 end }))
    ser_error(function() loads(s) end, "returned nil")
    ser_error(function()
      dumps(setmetatable({}, { __mp_reduce = function() return 42 end }))
    end, "did not return a kind")
  end)

  describe("with file descriptors", function()
    H.leakcheck()

    it("lists a Connection's fd and rebuilds it from loads' fds", function()
      local a, b = mp.Pipe()
      local s, fds = dumps({ conn = a, again = a })
      assert.are.same({ a:fileno() }, fds)
      local r = loads(s, { fds = fds })
      assert.are.equal(r.conn, r.again)
      assert.are_not.equal(a:fileno(), r.conn:fileno())   -- a duplicate
      r.conn:send("via copy")
      assert.are.equal("via copy", b:recv(1))
      r.conn:close(); a:close(); b:close()
    end)

    it("refuses a message that needs fds it was not given, closing the others", function()
      local a, b = mp.Pipe()
      local s, fds = dumps({ a, b })
      assert.are.equal(2, #fds)
      ser_error(function() loads(s) end, "needs fd #1 but 0 came")
      ser_error(function() loads(s, { fds = { fds[1] } }) end, "needs fd #2 but 1 came")
      a:close(); b:close()
    end)

    it("closes the fds when a handle kind is unknown", function()
      local a, b = mp.Pipe()
      local s = dumps(setmetatable({}, {
        __mp_reduce = function() return "spec.nokind", 0, a:fileno() end }))
      for _ = 1, 50 do
        ser_error(function() loads(s, { fds = { a:fileno() } }) end, "unknown handle kind")
      end
      a:close(); b:close()
    end)

    -- regression (fuzz finding): the library's own kinds, forged: a bad
    -- state or a missing fd is a SerializationError naming the kind, and
    -- the fds that came are closed
    it("refuses a forged handle of a library kind without leaking its fd", function()
      local a, b = mp.Pipe()
      local n0 = H.fd_count()
      local bad_state = dumps(setmetatable({}, {
        __mp_reduce = function() return "Connection", 42, a:fileno() end }))
      local no_fd = dumps(setmetatable({}, {
        __mp_reduce = function() return "Lock", false end }))
      for _ = 1, 50 do
        ser_error(function() loads(bad_state, { fds = { a:fileno() } }) end,
                  "Connection handle's state must be a table")
        ser_error(function() loads(no_fd) end, "the rebuild of handle kind 'Lock' failed")
      end
      assert.are.equal(n0, H.fd_count())
      a:close(); b:close()
    end)

    -- regression (fuzz finding): two handles on one fd each own a copy,
    -- and a failure part-way through leaks none
    it("gives each handle on a shared fd its own copy", function()
      local a, b = mp.Pipe()
      local FdUser = { __mp_reduce = function(self) return "spec.FdUser", self.n, self.fd end }
      core.register_handle("spec.FdUser", function(n, fd)
        return { n = n, conn = core.conn_from_fd(fd, true, true) }
      end)
      local s, fds = dumps({ setmetatable({ n = 1, fd = a:fileno() }, FdUser),
                             setmetatable({ n = 2, fd = a:fileno() }, FdUser) })
      assert.are.same({ a:fileno() }, fds)
      local r = loads(s, { fds = fds })
      assert.are.equal(1, r[1].n); assert.are.equal(2, r[2].n)
      assert.are_not.equal(r[1].conn:fileno(), r[2].conn:fileno())
      r[1].conn:send("one"); r[2].conn:send("two")
      assert.are.equal("one", b:recv(1)); assert.are.equal("two", b:recv(1))
      r[1].conn:close(); r[2].conn:close(); a:close(); b:close()
    end)

    it("refuses fd-carrying handles on a transport without fds (TCP; a " ..
       "Queue's items carry them now)", function()
      local l = mp.Listener("127.0.0.1:0")
      local c = mp.Client(l.address)
      local s = l:accept(5)
      local a, b = mp.Pipe()
      local ok, err = pcall(c.send, c, { a })
      assert.is_false(ok)
      assert.is_true(mp.SerializationError:is(err), tostring(err))
      assert.truthy(err.message:find("file descriptors", 1, true), err.message)
      c:close(); s:close(); l:close(); a:close(); b:close()
    end)
  end)
end)

describe("codec hostile input", function()
  local sample = {
    1, -1, 300, math.mininteger, 1.5, -0.0, "short", string.rep("long", 20),
    { nested = { deeper = { true, false } } }, [true] = "yes",
  }
  sample.self = sample
  local ok_msg = dumps(sample)

  it("raises on a version byte it does not read", function()
    local bad = string.char(2) .. ok_msg:sub(2)
    ser_error(function() loads(bad) end, "format version 2")
    ser_error(function() loads("\0") end, "format version 0")
    ser_error(function() loads("") end, "empty message")
  end)

  it("raises on every truncated prefix", function()
    for n = 0, #ok_msg - 1 do
      ser_error(function() loads(ok_msg:sub(1, n)) end)
    end
    assert.are.equal("short", loads(ok_msg)[7])
  end)

  it("raises on unknown header flags and on references without the flag", function()
    ser_error(function() loads("\1\2\0") end, "unknown header flags")
    ser_error(function() loads("\1\0\6\1\0\0\0\0\0\0\0\8\1") end, "bad reference")
    assert.are.equal(1, #loads("\1\1\6\1\0\0\0\0\0\0\0\8\1"))
  end)

  it("raises on trailing bytes", function()
    ser_error(function() loads(ok_msg .. "\0") end, "trailing bytes")
  end)

  it("raises on tables larger than the message, bad refs, bad keys", function()
    -- a table declaring 2^32-1 pairs / 10^9 array items in a few bytes
    ser_error(function() loads("\1\0\6\0\0\0\0\255\255\255\255") end, "larger than the message")
    ser_error(function() loads("\1\0\6\0\202\154\59\0\0\0\0") end, "larger than the message")
    ser_error(function() loads("\1\1\8\5") end, "bad reference")
    ser_error(function() loads("\1\0\6\0\0\0\0\1\0\0\0\0\1") end, "nil table key")
    ser_error(function() loads("\1\0\6\0\0\0\0\1\0\0\0\4\0\0\0\0\0\0\248\127\1") end, "NaN table key")
    ser_error(function() loads("\1\0\3\255\255\255\255\255\255\255\255\255\255\1") end,
              "out of range")
    ser_error(function() loads("\1\0\63") end, "unknown tag")
  end)

  it("never crashes on random mutations (functions=false)", function()
    local fn = function(x) return x + 1 end
    local msgs = { ok_msg, dumps({ fn, string.format, string }) }
    math.randomseed(12345)
    local decoded, refused = 0, 0
    for round = 1, 4000 do
      local m = msgs[round % #msgs + 1]
      local bytes = { m:byte(1, -1) }
      for _ = 1, math.random(1, 4) do
        local op, i = math.random(3), math.random(1, #bytes)
        if op == 1 then bytes[i] = math.random(0, 255)
        elseif op == 2 then table.remove(bytes, i)
        else table.insert(bytes, i, math.random(0, 255)) end
      end
      local s = string.char(table.unpack(bytes))
      local ok, err = pcall(loads, s, { functions = false })
      if ok then
        decoded = decoded + 1
      else
        refused = refused + 1
        assert.are.equal("SerializationError", type(err) == "table" and err.type or err)
      end
    end
    assert.is_true(decoded > 0 and refused > 0)
  end)
end)

describe("codec across processes", function()
  H.leakcheck()

  it("sends a module function to a forked child, where it keeps that child's module state", function()
    local mod = { n = 41 }
    function mod.bump() mod.n = mod.n + 1; return mod.n end
    package.loaded["spec.codec.forkmod"] = mod
    local a, b = mp.Pipe()
    local p = mp.Process{ target = function()
      local f = b:recv(5)
      b:send({ f == package.loaded["spec.codec.forkmod"].bump, f(), f() })
    end }
    p:start()
    mod.n = 1000          -- after fork: the child's copy still says 41
    a:send(mod.bump)
    assert.are.same({ true, 42, 43 }, a:recv(5))
    assert.are.equal(0, p:join(5))
    assert.are.equal(1000, mod.n)
    package.loaded["spec.codec.forkmod"] = nil
    a:close(); b:close()
  end)

  it("sends closures sharing an upvalue to a forked child", function()
    local a, b = mp.Pipe()
    local p = mp.Process{ target = function()
      local fs = b:recv(5)
      fs.set(5)
      b:send(fs.get() + fs.fact(5))
    end }
    p:start()
    local v = 0
    local function fact(n) return n <= 1 and 1 or n * fact(n - 1) end
    a:send({ set = function(x) v = x end, get = function() return v end, fact = fact })
    assert.are.equal(125, a:recv(5))
    assert.are.equal(0, p:join(5))
    a:close(); b:close()
  end)

  it("loads a closure in a fresh interpreter, as spawn does", function()
    local k = 6
    local f = function(x) return string.rep("ab", x) .. k .. type(utf8.char) end
    local msg, script = H.tmpname("codec-msg"), H.tmpname("codec-child.lua")
    local fh = assert(io.open(msg, "wb")); fh:write(dumps(f)); fh:close()
    fh = assert(io.open(script, "w"))
    fh:write(string.format([[
package.path = %q; package.cpath = %q
local mp = require "multiprocessing"
local fh = assert(io.open(%q, "rb")); local s = fh:read("a"); fh:close()
io.write(mp.loads(s)(2))
]], package.path, package.cpath, msg))
    fh:close()
    local p = io.popen("timeout 20 lua5.4 " .. script)
    local out = p:read("a")
    p:close()
    os.remove(msg); os.remove(script)
    assert.are.equal("abab6function", out)
  end)

  it("sends a Connection through a Pipe to a child", function()
    local a, b = mp.Pipe()
    local c, d = mp.Pipe()
    local p = mp.Process{ target = function()
      local conn = b:recv(5)
      conn:send("hello from the child")
      conn:close()
    end }
    p:start()
    a:send(c)
    assert.are.equal("hello from the child", d:recv(5))
    assert.are.equal(0, p:join(5))
    a:close(); b:close(); c:close(); d:close()
  end)
end)
