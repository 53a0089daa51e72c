-- Pool: arguments, every call of docs/api.md's Pools table, failures (killed
-- workers, os.exit, timeouts, retirement), callbacks, lifecycle.
local H = require "helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

-- (A task sleeps with require("multiprocessing.core").poll({}, t): no
-- child process, so nothing is left behind when its worker is killed.)

local function slurp(path)
  local f = io.open(path)
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

-- Run f with a pool of n workers that is always terminated afterwards.
local function with_pool(opts, f)
  local pool = mp.Pool(opts)
  local ok, err = pcall(f, pool)
  pool:terminate()
  if not ok then error(err, 0) end
end

describe("Pool arguments", function()
  H.leakcheck()

  it("rejects Pool(0), negative counts, bad types and unknown options", function()
    assert.has_error(function() mp.Pool(0) end)
    assert.has_error(function() mp.Pool(-2) end)
    assert.has_error(function() mp.Pool(1.5) end)
    assert.has_error(function() mp.Pool("2") end)
    assert.has_error(function() mp.Pool{ processes = 0 } end)
    assert.has_error(function() mp.Pool{ procesess = 2 } end)
    assert.has_error(function() mp.Pool{ initializer = 5 } end)
    assert.has_error(function() mp.Pool{ initargs = 5 } end)
    assert.has_error(function() mp.Pool{ maxtasksperchild = 0 } end)
    assert.has_error(function() mp.Pool{ max_memory_per_child = -1 } end)
    local ok, err = pcall(mp.Pool, 0)
    assert.is_false(ok)
    assert.truthy(tostring(err):find("processes", 1, true))
  end)

  it("names the call, not an internal function, for too many processes", function()
    for _, arg in ipairs({ 100000, { processes = 100000 } }) do
      local ok, err = pcall(function() return mp.Pool(arg) end)
      assert.is_false(ok)
      err = tostring(err)
      assert.truthy(err:find("bad argument #1 to 'Pool' ('processes' must be an integer in 1..4096, got 100000)",
                             1, true), err)
      assert.is_nil(err:find("pool_new", 1, true))
      assert.is_nil(err:find("pool.lua", 1, true))
    end
  end)

  it("starts its workers with its start method, even from inside busted", function()
    -- (no entry chunk here: what travels must be bytecode or module functions)
    -- luacheck: globals INIT_V
    for _, m in ipairs({ "spawn", "forkserver" }) do
      local k = 5
      local pool = mp.get_context(m).Pool{ processes = 2, initializer = function(v) INIT_V = v end,
                                            initargs = { 100 } }
      assert.are.equal(m, pool._method)
      local ok, err = pcall(function()
        assert.are.same({ 106, 107, 108, n = 3 },
                        pool:map(function(x) return x + k + INIT_V end, { 1, 2, 3 }))
        local pid, main = pool:apply(function()
          return require("multiprocessing.core").getpid(), require("multiprocessing").is_main()
        end)
        assert.are_not.equal(core.getpid(), pid)
        assert.is_false(main)            -- a fresh interpreter, not a fork
        assert.is_nil(rawget(_G, "INIT_V"))
      end)
      pool:terminate()
      if m == "forkserver" then require("multiprocessing.spawn")._forkserver_stop() end
      assert(ok, err)
    end
  end)

  it("raises at creation when its initializer or initargs cannot travel to a spawned worker", function()
    local ok, err = pcall(mp.get_context("spawn").Pool, { processes = 2, initializer = print,
                                                          initargs = { io.stdout } })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("SerializationError", 1, true), tostring(err))
    assert.truthy(tostring(err):find("FILE*", 1, true), tostring(err))
  end)

  it("refuses to be used from a forked child, which cannot touch its workers", function()
    with_pool(1, function(pool)
      local file = H.tmpname("own")
      local p = mp.Process{ target = function()
        local ok, err = pcall(pool.apply, pool, print, {})
        local ok2 = pcall(pool.terminate, pool)
        local f = io.open(file, "w")
        f:write(tostring(ok), " ", tostring(ok2), " ", tostring(err and err.message))
        f:close()
      end }
      p:start()
      assert.are.equal(0, p:join(10))
      local out = slurp(file)
      os.remove(file)
      assert.truthy(out:find("^false false this Pool belongs to process"), out)
      assert.are.equal(2, pool:apply(function() return 2 end))
    end)
  end)

  it("rejects bad arguments to the calls, naming them", function()
    with_pool(1, function(pool)
      assert.has_error(function() pool:apply(5, {}) end)
      assert.has_error(function() pool:apply(print, 5) end)
      assert.has_error(function() pool:map(print, 5) end)
      assert.has_error(function() pool:map(print, { 1 }, 0) end)
      assert.has_error(function() pool:map(print, { 1 }, { chunksize = "x" }) end)
      assert.has_error(function() pool:map(print, { 1 }, { bogus = 1 }) end)
      assert.has_error(function() pool:apply_async(print, {}, { timeout = -1 }) end)
      assert.has_error(function() pool:apply_async(print, {}, { callback = 1 }) end)
      assert.has_error(function() pool:starmap(print, { 1, 2 }) end)
      assert.has_error(function() pool:poll(-1) end)
      local ok, err = pcall(pool.map, pool, print, { 1 }, 0)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("chunksize", 1, true))
    end)
  end)

  it("carries every kind of value both ways, scalars at the codec's size boundaries too", function()
    local nan = 0 / 0
    local values = { 0, 1, 127, 128, 16383, 16384, (1 << 20) - 1, 1 << 20, -1, -64, -65,
                     -(1 << 20), math.maxinteger, math.mininteger, 2.0, -0.0, 1.5, 1e300,
                     math.huge, -math.huge, "", "x", string.rep("s", 31), string.rep("l", 32),
                     "a\0b", string.rep("z", 70000), true, false, { 1, "two", { three = 3 } } }
    local function same(a, b)
      if type(a) == "table" then return type(b) == "table" and a[1] == b[1] and a[2] == b[2]
                                        and b[3].three == 3 end
      return math.type(a) == math.type(b) and (a == b and (a ~= 0 or 1 / a == 1 / b))
    end
    with_pool(2, function(pool)
      for _, chunksize in ipairs({ 1, 7 }) do
        local r = pool:map(function(v) return v end, values, chunksize)
        for i, v in ipairs(values) do assert.is_true(same(v, r[i]), "map item " .. i) end
      end
      for i, v in ipairs(values) do
        local a, b, c, d = pool:apply(function(x) return nil, x, false, nil end, { v })
        assert.is_nil(a)
        assert.is_true(same(v, b), "apply item " .. i)
        assert.is_false(c)
        assert.is_nil(d)
      end
      local got = pool:apply(function(x) return x end, { nan })
      assert.is_true(got ~= got)
      local s = pool:starmap(function(...) return select("#", ...), ... end,
                             { { 1, nil, 3, n = 3 }, { n = 0 }, { "x", 2.5 } })
      assert.are.same({ 3, 0, 2, n = 3 }, s)
    end)
  end)

  it("raises SerializationError for arguments that cannot travel", function()
    with_pool(1, function(pool)
      local ok, err = pcall(pool.apply_async, pool, function(f) return f end, { io.stdout })
      assert.is_false(ok)
      assert.is_true(mp.SerializationError:is(err))
      assert.are.equal("args[1]: cannot serialize userdata (FILE*)", err.message)
      -- a closure's upvalues travel as they are at each call (its bytes
      -- are not reused); a function without upvalues is dumped once
      local n = 1
      local function add(x) return x + n end
      assert.are.equal(2, pool:apply(add, { 1 }))
      n = 10
      assert.are.equal(11, pool:apply(add, { 1 }))
      -- a map item that cannot travel fails the map, the pool goes on
      ok, err = pcall(pool.map, pool, function(x) return x end, { 1, io.stdout, 3 })
      assert.is_false(ok)
      assert.is_true(mp.SerializationError:is(err))
      assert.are.equal(4, pool:apply(function(x) return x * 2 end, { 2 }))
    end)
  end)

  it("refuses calls on a closed or terminated pool, and join while running", function()
    local pool = mp.Pool(1)
    assert.has_error(function() pool:join() end)
    pool:close()
    local ok, err = pcall(pool.apply, pool, print, {})
    assert.is_false(ok)
    assert.truthy(tostring(err):find("not running", 1, true))
    assert.has_error(function() pool:map(print, { 1 }) end)
    pool:join()
    assert.are.equal("<Pool(processes=1, joined)>", tostring(pool))
    local p2 = mp.Pool(1)
    p2:terminate()
    assert.has_error(function() p2:imap(print, { 1 }) end)
    p2:terminate()                       -- twice is fine
    p2:join()                            -- returns at once
  end)
end)

describe("Pool behaviour", function()
  H.leakcheck()

  it("apply returns several results, nils included", function()
    with_pool(2, function(pool)
      local n = select("#", pool:apply(function(a) return a, nil, "z", nil end, { 1 }))
      assert.are.equal(4, n)
      local a, b, c = pool:apply(function(x, y) return x + y, nil, y end, { 2, 3 })
      assert.are.same({ 5, nil, 3 }, { a, b, c })
      assert.are.equal(0, select("#", pool:apply(function() end)))
      -- table.pack'd arguments keep their nils
      assert.are.equal(3, pool:apply(function(...) return select("#", ...) end,
                                     table.pack(nil, nil, 1)))
    end)
  end)

  it("map keeps order, runs closures with their upvalues, keeps nil holes", function()
    with_pool(2, function(pool)
      local k = 10
      local xs = {}
      for i = 1, 1000 do xs[i] = i end
      local r = pool:map(function(x) return x + k end, xs)
      assert.are.equal(1000, #r)
      for i = 1, 1000 do assert.are.equal(i + 10, r[i]) end
      local odd = pool:map(function(x) if x % 2 == 1 then return x end end, { 1, 2, 3, 4 })
      assert.are.equal(4, odd.n)
      assert.are.same({ 1, nil, 3, nil }, { odd[1], odd[2], odd[3], odd[4] })
      local empty = pool:map(print, {})
      assert.are.equal(0, #empty)
      assert.are.equal(0, empty.n)
      -- explicit chunk sizes, bigger than the list too
      for _, cs in ipairs{ 1, 3, 7, 5000 } do
        local rr = pool:map(function(x) return -x end, xs, cs)
        assert.are.equal(-1000, rr[1000])
        assert.are.equal(-1, rr[1])
      end
      -- values of every kind travel both ways
      local t = pool:apply(function(v) return v end, { { a = { 1, 2 }, s = "x\0y", f = 1.5 } })
      assert.are.same({ a = { 1, 2 }, s = "x\0y", f = 1.5 }, t)
    end)
  end)

  it("runs more distinct closures than its function cache holds", function()
    with_pool(2, function(pool)
      local rs = {}
      for i = 1, 600 do
        local k = i
        rs[i] = pool:apply_async(function(x) return x + k end, { 1 })
      end
      for i = 1, 600 do assert.are.equal(i + 1, rs[i]:get(10)) end
    end)
  end)

  it("starmap and starmap_async unpack argument lists", function()
    with_pool(2, function(pool)
      local r = pool:starmap(function(a, b) return a * b end, { { 2, 3 }, { 4, 5 }, { 6, 7 } })
      assert.are.same({ 6, 20, 42 }, { r[1], r[2], r[3] })
      local ar = pool:starmap_async(function(_, _, c) return c end, { { 1, 2, 3 }, table.pack(1, nil, 9) })
      local rr = ar:get(10)
      assert.are.same({ 3, 9 }, { rr[1], rr[2] })
    end)
  end)

  it("imap gives positions and results in input order", function()
    with_pool(3, function(pool)
      local xs = {}
      for i = 1, 30 do xs[i] = i end
      local seen = {}
      for i, v, extra in pool:imap(function(x)
        require("multiprocessing.core").poll({}, (x % 3) * 0.005)
        return x * 2, "e" .. x
      end, xs) do
        seen[#seen + 1] = i
        assert.are.equal(i * 2, v)
        assert.are.equal("e" .. i, extra)
      end
      assert.are.equal(30, #seen)
      for i = 1, 30 do assert.are.equal(i, seen[i]) end
      -- a task returning nil does not end the loop
      local count = 0
      for i, v in pool:imap(function() return nil end, { 1, 2, 3 }) do
        count = count + 1
        assert.is_nil(v)
        assert.are.equal(count, i)
      end
      assert.are.equal(3, count)
    end)
  end)

  it("imap_unordered gives every position exactly once", function()
    with_pool(3, function(pool)
      local xs = {}
      for i = 1, 50 do xs[i] = i end
      local got = {}
      for i, v in pool:imap_unordered(function(x)
        require("multiprocessing.core").poll({}, ((x * 7) % 5) * 0.002)
        return x * x
      end, xs, 2) do
        assert.is_nil(got[i])
        got[i] = v
      end
      for i = 1, 50 do assert.are.equal(i * i, got[i]) end
    end)
  end)

  it("reads an iterator no further than a window ahead of an imap's consumer", function()
    with_pool(2, function(pool)
      local pulled = 0
      local it = pool:imap(function(x) return x end, function() pulled = pulled + 1; return pulled end)
      assert.are.equal(1, (it()))
      for _ = 1, 20 do pool:poll(0.01) end
      assert.is_true(pulled <= 256 + 1, "pulled " .. pulled)
      local i = 1
      while i < 600 do i = it() end       -- reading on moves the window
      assert.are.equal(600, i)
      assert.is_true(pulled >= 600)
    end)
  end)

  it("consumes an iterator input lazily", function()
    with_pool(2, function(pool)
      local pulled = 0
      local function gen()
        if pulled < 1000 then pulled = pulled + 1; return pulled end
      end
      local it = pool:imap(function(x) return x + 1 end, gen)
      local i, v = it()
      assert.are.same({ 1, 2 }, { i, v })
      assert.is_true(pulled < 1000)
      local n = 1
      for j, w in it do
        n = n + 1
        assert.are.equal(j + 1, w)
      end
      assert.are.equal(1000, n)
      assert.are.equal(1000, pulled)
      -- imap_unordered over an iterator, and map over one
      local sum = 0
      local k = 0
      for _, w in pool:imap_unordered(function(x) return x end, function()
        if k < 20 then k = k + 1; return k end
      end) do sum = sum + w end
      assert.are.equal(210, sum)
      local c = 0
      local r = pool:map(function(x) return x * 3 end, function()
        if c < 5 then c = c + 1; return c end
      end)
      assert.are.same({ 3, 6, 9, 12, 15 }, { r[1], r[2], r[3], r[4], r[5] })
    end)
  end)

  it("runs the initializer with its initargs in every worker", function()
    -- busted runs a spec in its own environment; load gives the real globals,
    -- which is what a task's _ENV is in a worker
    local init = load("local a, b = ...; WORKER_TAG = a .. b")
    with_pool({ processes = 2, initializer = init, initargs = { "x", 7 } }, function(pool)
      local r = pool:map(function() return _G.WORKER_TAG end, { 1, 2, 3, 4 }, 1)
      for i = 1, 4 do assert.are.equal("x7", r[i]) end
      assert.is_nil(rawget(_G, "WORKER_TAG"))
    end)
  end)

  it("fails every task with the initializer's error when it raises", function()
    with_pool({ processes = 1, initializer = function() error("init broke") end }, function(pool)
      local ok, err = pcall(pool.apply, pool, function() return 1 end, {})
      assert.is_false(ok)
      assert.is_true(mp.RemoteError:is(err))
      assert.truthy(err.message:find("init broke", 1, true))
      assert.has_error(function() pool:apply(print, {}) end)
    end)
  end)

  it("is broken, not restarted forever, when a worker leaves before it is ready", function()
    -- (regression: an initializer that calls os.exit made each replacement
    -- exit the same way, and the pool restarted workers without end)
    with_pool({ processes = 2, initializer = function() os.exit(4) end }, function(pool)
      local r = pool:map_async(function(x) return x end, { 1, 2, 3 })
      local ok, err = pcall(r.get, r, 10)
      assert.is_false(ok)
      assert.is_true(mp.ProcessError:is(err), tostring(err))
      assert.truthy(err.message:find("exited with code 4 before it was ready", 1, true), err.message)
      assert.are.equal(4, err.exitcode)
      assert.is_true(pool:stats().restarts <= 1)
      assert.has_error(function() pool:apply(print, {}) end)
    end)
  end)

  it("runs callback and error_callback in the parent", function()
    with_pool(2, function(pool)
      local me = core.getpid()
      local got, gotpid, goterr
      local r = pool:apply_async(function(x) return x + 1, "two" end, { 41 }, {
        callback = function(a, b) got = { a, b }; gotpid = core.getpid() end })
      assert.are.equal(42, (r:get(10)))
      assert.are.same({ 42, "two" }, got)
      assert.are.equal(me, gotpid)
      local r2 = pool:apply_async(function() error("bad task") end, {}, {
        callback = function() error("not called") end,
        error_callback = function(e) goterr = e end })
      assert.is_true(r2:wait(10))
      assert.is_false(r2:successful())
      pool:poll()
      assert.is_true(mp.RemoteError:is(goterr))
      assert.truthy(goterr.message:find("bad task", 1, true))
      local list
      pool:map_async(function(x) return x * 2 end, { 1, 2, 3 },
                     { callback = function(l) list = l end }):wait(10)
      pool:poll()
      assert.are.same({ 2, 4, 6 }, { list[1], list[2], list[3] })
    end)
  end)

  it("lets a callback's error out of the call that ran it; the pool goes on", function()
    with_pool(1, function(pool)
      local r = pool:apply_async(function() return 1 end, {}, {
        callback = function() error("callback broke") end })
      local ok, err = pcall(r.get, r, 10)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("callback broke", 1, true))
      assert.are.equal(1, r:get(0))
      assert.are.equal(2, pool:apply(function() return 2 end))
    end)
  end)

  it("raises a task's error as a RemoteError with the worker's traceback", function()
    with_pool(2, function(pool)
      local function inner() error("deep failure") end
      local ok, err = pcall(pool.apply, pool, function() inner() end, {})
      assert.is_false(ok)
      assert.is_true(mp.RemoteError:is(err))
      assert.truthy(err.message:find("deep failure", 1, true))
      assert.truthy(err.message:find("07%-pool_spec%.lua:%d+"))
      assert.is_number(err.pid)
      assert.are_not.equal(core.getpid(), err.pid)
      assert.truthy(err.traceback:find("inner", 1, true))
      assert.truthy(err.traceback:find("07-pool_spec.lua", 1, true))
      assert.falsy(err.traceback:find("busted", 1, true))
      assert.truthy(tostring(err):find("deep failure", 1, true))
      -- error objects keep their type as remote_type
      ok, err = pcall(pool.apply, pool, function()
        error(require("multiprocessing").TimeoutError("inner timeout"))
      end, {})
      assert.is_false(ok)
      assert.are.equal("TimeoutError", err.remote_type)
      assert.are.equal("inner timeout", err.message)
      -- map raises the first failure; the other tasks ran
      ok, err = pcall(pool.map, pool, function(x)
        if x == 3 or x == 7 then error("item " .. x) end
        return x
      end, { 1, 2, 3, 4, 5, 6, 7, 8 }, 1)
      assert.is_false(ok)
      assert.truthy(err.message:find("item 3", 1, true))
      -- a result that cannot travel is the task's error
      ok, err = pcall(pool.apply, pool, function() return io.stdout end, {})
      assert.is_false(ok)
      assert.are.equal("SerializationError", err.remote_type)
      -- and the pool still works
      assert.are.equal(9, pool:apply(function(x) return x * x end, { 3 }))
    end)
  end)

  it("AsyncResult: get with a timeout, wait, ready, successful", function()
    with_pool(1, function(pool)
      local r = pool:apply_async(function() require("multiprocessing.core").poll({}, 0.3); return "late" end)
      local v, why = r:get(0.01)
      assert.is_nil(v)
      assert.are.equal("timeout", why)
      assert.is_false(r:wait(0.01))
      assert.is_false(r:ready())
      assert.has_error(function() r:successful() end)
      assert.is_true(r:wait(10))
      assert.is_true(r:ready())
      assert.is_true(r:successful())
      assert.are.equal("late", r:get())
      assert.are.equal("late", r:get(0))
      assert.has_error(function() r:get(-1) end)
    end)
  end)

  it("stats counts workers, done, failed and queued tasks", function()
    with_pool(2, function(pool)
      local s = pool:stats()
      assert.are.same({ workers = 2, busy = 0, queued = 0, done = 0, failed = 0, restarts = 0 }, s)
      pcall(pool.map, pool, function(x) if x == 2 then error("x") end end, { 1, 2, 3 }, 1)
      s = pool:stats()
      assert.are.equal(3, s.done)
      assert.are.equal(1, s.failed)
      -- a task of unknown speed waits for a free worker
      local rs = {}
      for i = 1, 6 do
        rs[i] = pool:apply_async(function() require("multiprocessing.core").poll({}, 0.2) end)
      end
      s = pool:stats()
      assert.are.equal(2, s.busy)
      assert.are.equal(4, s.queued)
      for i = 1, 6 do rs[i]:get(10) end
      assert.are.equal(9, pool:stats().done)
    end)
  end)

  it("reports progress to a function, ending at done == total", function()
    with_pool(2, function(pool)
      local calls, last = 0, nil
      pool:map(function(x) return x end, { 1, 2, 3, 4, 5, 6, 7, 8 }, {
        chunksize = 1, progress = function(done, total) calls = calls + 1; last = { done, total } end })
      pool:poll()
      assert.is_true(calls >= 1)
      assert.are.same({ 8, 8 }, last)
    end)
  end)

  it("draws no progress bar when stderr is not a terminal", function()
    local out, code = H.run_lua(([[
      package.path = %q
      package.cpath = %q
      local mp = require "multiprocessing"
      local pool = mp.Pool(2)
      local r = pool:map(function(x) return x end, { 1, 2, 3, 4 }, { chunksize = 1, progress = true })
      pool:close(); pool:join()
      print("sum=" .. (r[1] + r[2] + r[3] + r[4]))
    ]]):format(package.path, package.cpath), 30)
    assert.are.equal(0, code, out)
    assert.are.equal("sum=10\n", out)
  end)

  it("lets an event loop wait on pool:fileno() and drive it with poll", function()
    with_pool(2, function(pool)
      local got
      pool:apply_async(function() return "ev" end, {}, { callback = function(v) got = v end })
      local fd = pool:fileno()
      local deadline = core.monotonic() + 10
      while not got and core.monotonic() < deadline do
        core.poll({ fd }, 1)
        pool:poll()
      end
      assert.are.equal("ev", got)
      assert.are.equal(0, pool:poll())
    end)
  end)

  it("gives a worker no fd of another pool or of its siblings", function()
    local function worker_fds(pool)
      return pool:apply(function()
        local pid = require("multiprocessing.core").getpid()
        local p = io.popen("ls /proc/" .. pid .. "/fd | wc -l")
        local n = tonumber(p:read("a"))
        p:close()
        return n
      end)
    end
    collectgarbage(); collectgarbage()
    local alone = mp.Pool(1)
    local n1 = worker_fds(alone)
    alone:terminate()
    collectgarbage(); collectgarbage()
    local other = mp.Pool(6)               -- 6 channels, 6 sentinels, 2 more
    local second = mp.Pool(4)
    local n2 = worker_fds(second)
    second:terminate()
    other:terminate()
    -- (a little slack: the parent's own fds may change in between)
    assert.is_true(n2 <= n1 + 2, ("%d fds alone, %d beside another pool"):format(n1, n2))
  end)

  it("gives a worker started with an initializer no fd of another pool either", function()
    local function worker_fds(opts)
      local pool = mp.Pool(opts)
      local n = pool:apply(function()
        local pid = require("multiprocessing.core").getpid()
        local p = io.popen("ls /proc/" .. pid .. "/fd | wc -l")
        local k = tonumber(p:read("a"))
        p:close()
        return k
      end)
      pool:terminate()
      return n
    end
    local init = { processes = 1, initializer = function() end }
    collectgarbage(); collectgarbage()
    local n1 = worker_fds(init)
    collectgarbage(); collectgarbage()
    local other = mp.Pool(6)
    init.processes = 4
    local n2 = worker_fds(init)
    other:terminate()
    assert.is_true(n2 <= n1 + 2, ("%d fds alone, %d beside another pool"):format(n1, n2))
  end)

  it("close and join finish the queued tasks first", function()
    local pool = mp.Pool(2)
    local r = pool:map_async(function(x) require("multiprocessing.core").poll({}, 0.01); return x end,
                             { 1, 2, 3, 4, 5, 6 }, 1)
    pool:close()
    pool:join()
    local v = r:get(0)
    assert.are.equal(6, v[6])
    assert.are.equal(0, #H.children())
  end)
end)

describe("Pool failures", function()
  H.leakcheck()

  it("a worker killed with SIGKILL mid-task fails exactly its task; the pool goes on", function()
    with_pool(2, function(pool)
      local file = H.tmpname("pid")
      local other = pool:apply_async(function()
        require("multiprocessing.core").poll({}, 0.3)
        return "fine"
      end)
      local r = pool:apply_async(function(path)
        local c = require "multiprocessing.core"
        local f = io.open(path, "w"); f:write(c.getpid()); f:close()
        c.poll({}, 30)
        return "not reached"
      end, { file })
      local pid = H.wait_until(function() return tonumber(slurp(file) or "") end, 10)
      os.remove(file)
      assert.is_number(pid)
      core.kill(pid, 9)
      local ok, err = pcall(r.get, r, 10)
      assert.is_false(ok)
      assert.is_true(mp.WorkerLostError:is(err))
      assert.are.equal(pid, err.pid)
      assert.are.equal(-9, err.exitcode)
      assert.truthy(err.message:find(tostring(pid), 1, true))
      assert.truthy(err.message:find("-9", 1, true))
      assert.are.equal("fine", other:get(10))
      local xs = {}
      for i = 1, 100 do xs[i] = i end
      local out = pool:map(function(x) return x * 2 end, xs, 1)
      for i = 1, 100 do assert.are.equal(2 * i, out[i]) end
      local s = pool:stats()
      assert.are.equal(1, s.restarts)
      assert.are.equal(2, s.workers)
    end)
  end)

  it("os.exit(3) in a task fails it with WorkerLostError exit code 3", function()
    with_pool(1, function(pool)
      local ok, err = pcall(pool.apply, pool, function() os.exit(3) end, {})
      assert.is_false(ok)
      assert.is_true(mp.WorkerLostError:is(err))
      assert.are.equal(3, err.exitcode)
      assert.are.equal(5, pool:apply(function() return 5 end, {}))
      -- tasks queued behind the lost one are not lost
      local ok2, err2 = pcall(pool.map, pool, function(x)
        if x == 1 then os.exit(4) end
        return x
      end, { 1, 2, 3, 4 }, 1)
      assert.is_false(ok2)
      assert.are.equal(4, err2.exitcode)
      assert.are.equal(2, pool:stats().restarts)
      assert.are.equal(3, pool:stats().done - pool:stats().failed - 1)
    end)
  end)

  -- A warm fast function gets up to 64 chunks in flight per worker, sent
  -- as runs of chunks in one call (pool_scheduler.lua's _send_run). Maps
-- wait at most 60 s: get(60) returns nil, "timeout" when a chunk is lost.
  local function warm(pool, f)
    local xs = {}
    for i = 1, 1000 do xs[i] = i end
    assert.are.equal(1000, #pool:map_async(f, xs, 1):get(60))
    return xs
  end

  it("runs of chunks put every result in its place; an item that cannot travel fails its chunk alone", function()
    with_pool(2, function(pool)
      local function f(x) return x * 2 end
      local xs = warm(pool, f)
      for _, cs in ipairs({ 1, 3, 7 }) do        -- 1000 items: a short last chunk
        local out = pool:map_async(f, xs, cs):get(60)
        assert.are.equal(1000, out.n)
        for i = 1, 1000 do assert.are.equal(2 * i, out[i]) end
        local bad = table.move(xs, 1, 1000, 1, {})
        bad[500], bad[505] = io.stdout, io.stdout      -- in two chunks of any size here
        local s0 = pool:stats()
        local r = pool:map_async(f, bad, cs)
        local ok, err = pcall(r.get, r, 60)
        local s1 = pool:stats()
        assert.is_false(ok)
        assert.is_true(mp.SerializationError:is(err))
        assert.are.equal(1000, s1.done - s0.done)         -- the rest was sent again
        assert.are.equal(2 * cs, s1.failed - s0.failed)   -- the chunks of 500 and 505
      end
      -- positions stay integers whatever depth the function's speed gives
      local function busy(x)
        local t = os.clock() + 1e-5
        repeat until os.clock() >= t
        return x
      end
      for _ = 1, 2 do
        local seen = 0
        for i, v in pool:imap_unordered(busy, xs, 1) do
          assert.are.equal("integer", math.type(i))
          assert.are.equal(i, v)
          seen = seen + 1
        end
        assert.are.equal(1000, seen)
      end
      -- starmap's argument lists, plain and not (a table among them)
      local function g(a, b, t) return a + b + (t and t.x or 0) end
      local args = {}
      for i = 1, 1000 do args[i] = { i, 2 * i, i % 3 == 0 and { x = 1 } or nil, n = 3 } end
      for _, cs in ipairs({ 1, 1, 7 }) do                -- (the first warms g up)
        local r = pool:starmap_async(g, args, cs)
        local out = r:get(60)
        for i = 1, 1000 do assert.are.equal(3 * i + (i % 3 == 0 and 1 or 0), out[i]) end
      end
    end)
  end)

  it("a worker that dies inside a run of chunks: no task is lost or runs twice", function()
    with_pool(2, function(pool)
      local file = H.tmpname("ran")
      finally(function() os.remove(file) end)
      local xs = warm(pool, function(x) return x end)
      local r = pool:map_async(function(x)
        if x == 300 then os.exit(5) end
        local f = io.open(file, "a")
        f:write(x, "\n")
        f:close()
        return x
      end, xs, 1)
      local ok, err = pcall(r.get, r, 60)
      assert.is_false(ok)
      assert.is_true(mp.WorkerLostError:is(err))
      assert.are.equal(5, err.exitcode)
      local count = {}
      for line in io.lines(file) do
        local x = tonumber(line)
        count[x] = (count[x] or 0) + 1
      end
      for i = 1, 1000 do
        assert.are.equal(i ~= 300 and 1 or nil, count[i], "task " .. i)
      end
      assert.are.equal(1, pool:stats().restarts)
      local out = pool:map_async(function(x) return -x end, xs, 1):get(60)
      for i = 1, 1000 do assert.are.equal(-i, out[i]) end
    end)
  end)

  it("only the running chunk fails when a worker dies with more queued", function()
    with_pool(1, function(pool)
      local rs = {}
      for i = 1, 5 do
        rs[i] = pool:apply_async(function(x) if x == 2 then os.exit(7) end return x end, { i })
      end
      assert.are.equal(1, rs[1]:get(10))
      local ok, err = pcall(rs[2].get, rs[2], 10)
      assert.is_false(ok)
      assert.are.equal(7, err.exitcode)
      for i = 3, 5 do assert.are.equal(i, rs[i]:get(10)) end
    end)
  end)

  it("a task past its timeout has its worker killed and fails with TimeoutError", function()
    with_pool(2, function(pool)
      local r = pool:apply_async(function() require("multiprocessing.core").poll({}, 30) end, {},
                                 { timeout = 0.2 })
      local quick = pool:apply_async(function() return "quick" end, {}, { timeout = 5 })
      local ok, err = pcall(r.get, r, 10)
      assert.is_false(ok)
      assert.is_true(mp.TimeoutError:is(err))
      assert.truthy(err.message:find("timed out", 1, true))
      assert.are.equal("quick", quick:get(10))
      assert.are.equal(1, pool:stats().restarts)
      assert.are.equal(2, pool:apply(function() return 2 end, {}))
    end)
  end)

  it("maxtasksperchild replaces workers between tasks", function()
    with_pool({ processes = 2, maxtasksperchild = 1 }, function(pool)
      local pids = pool:map(function() return require("multiprocessing.core").getpid() end,
                            { 1, 2, 3, 4, 5, 6 }, 1)
      local seen = {}
      for i = 1, 6 do
        assert.is_nil(seen[pids[i]])
        seen[pids[i]] = true
      end
    end)
    with_pool({ processes = 1, maxtasksperchild = 3 }, function(pool)
      local pids = pool:map(function() return require("multiprocessing.core").getpid() end,
                            { 1, 2, 3, 4, 5, 6 })
      assert.are.equal(pids[1], pids[3])
      assert.are_not.equal(pids[3], pids[4])
      assert.are.equal(pids[4], pids[6])
    end)
  end)

  it("a worker at maxtasksperchild leaves even with a cache message queued", function()
    -- regression: a quick last task whose result was held back while a
    -- function-cache CLEAR waited made the worker wait for more work
    with_pool({ processes = 1, maxtasksperchild = 1 }, function(pool)
      local rs = {}
      for i = 1, 300 do
        local k = i
        rs[i] = pool:apply_async(function() return k end)
      end
      for i = 1, 300 do assert.are.equal(i, rs[i]:get(10)) end
      -- (the 300th worker's exit may or may not have been seen yet)
      assert.is_true(pool:stats().restarts >= 299)
    end)
  end)

  it("max_memory_per_child retires a worker whose heap grew", function()
    with_pool({ processes = 1, max_memory_per_child = 8e6 }, function(pool)
      local getpid = function() return require("multiprocessing.core").getpid() end
      local a = pool:apply(getpid)
      local b = pool:apply(getpid)
      assert.are.equal(a, b)
      local c = pool:apply(function() _G.BIG = string.rep("x", 16e6); return 1 end)
      assert.are.equal(1, c)
      local d = pool:apply(getpid)
      assert.are_not.equal(a, d)
      assert.are.equal(1, pool:stats().restarts)
    end)
  end)

  it("max_memory_per_child retires spawned workers too, and they are replaced by spawn", function()
    local pool = mp.get_context("spawn").Pool{ processes = 1, max_memory_per_child = 8e6 }
    local ok, err = pcall(function()
      local getpid = function() return require("multiprocessing.core").getpid() end
      local a = pool:apply(getpid)
      assert.are.equal(a, pool:apply(getpid))
      assert.are.equal(1, pool:apply(function() _G.BIG = string.rep("x", 16e6); return 1 end))
      local d, main = pool:apply(function()
        return require("multiprocessing.core").getpid(), require("multiprocessing").is_main()
      end)
      assert.are_not.equal(a, d)
      assert.is_false(main)              -- the replacement was spawned, not forked
      assert.are.equal(1, pool:stats().restarts)
    end)
    pool:terminate()
    assert(ok, err)
  end)

  it("workers ignore SIGINT: the task finishes", function()
    with_pool(1, function(pool)
      local file = H.tmpname("pid")
      local r = pool:apply_async(function(path)
        local c = require "multiprocessing.core"
        local f = io.open(path, "w"); f:write(c.getpid()); f:close()
        c.poll({}, 0.3)
        return "survived"
      end, { file })
      local pid = H.wait_until(function() return tonumber(slurp(file) or "") end, 10)
      os.remove(file)
      core.kill(pid, 2)
      assert.are.equal("survived", r:get(10))
    end)
  end)

  it("an idle worker that dies is replaced without failing anything", function()
    with_pool(2, function(pool)
      local pids = pool:map(function() return require("multiprocessing.core").getpid() end, { 1, 2 }, 1)
      core.kill(pids[1], 9)
      assert.truthy(H.wait_until(function() pool:poll(0.05); return pool:stats().restarts == 1 end, 10))
      local s = pool:stats()
      assert.are.equal(0, s.failed)
      assert.are.equal(2, s.workers)
      assert.are.equal(3, pool:apply(function() return 3 end))
    end)
  end)

  it("terminate with 10,000 queued tasks returns promptly and leaves no process", function()
    local pool = mp.Pool(2)
    local r = pool:map_async(function() require("multiprocessing.core").poll({}, 0.01) end,
                             (function() local t = {} for i = 1, 10000 do t[i] = i end return t end)(), 1)
    local it = pool:imap(function(x) return x end, { 1, 2, 3 })
    pool:poll(0.05)
    local t0 = core.monotonic()
    pool:terminate()
    assert.is_true(core.monotonic() - t0 < 5)
    assert.are.equal(0, #H.children())
    local ok, err = pcall(r.get, r, 1)
    assert.is_false(ok)
    assert.is_true(mp.ProcessError:is(err))
    assert.has_error(function() it() end)
  end)

  it("a to-be-closed pool is terminated at the end of its block, even on error", function()
    local ok = pcall(function()
      local pool <close> = mp.Pool(2)
      pool:apply_async(function() require("multiprocessing.core").poll({}, 30) end)
      error("leave the block")
    end)
    assert.is_false(ok)
    assert.are.equal(0, #H.children())
  end)

  it("__gc of a forgotten pool kills and reaps its workers", function()
    do
      local pool = mp.Pool(2)
      pool:apply_async(function() require("multiprocessing.core").poll({}, 30) end)
    end
    collectgarbage(); collectgarbage()
    assert.truthy(H.wait_until(function() return #H.children() == 0 end, 5))
  end)
end)

-- A forked worker with no initializer waits in C for its first frame
-- (pool.c's lazy_wait): what it must have done before it waits.
describe("Pool workers before their first task", function()
  H.leakcheck()

  local function ready(pool, slot) return select(3, pool._pc:started(slot)) end

  local function fd_count(pid)
    local p = io.popen("ls /proc/" .. pid .. "/fd 2>/dev/null | wc -l")
    local n = tonumber(p:read("a"))
    p:close()
    return n
  end

  -- pids of pool's n idle workers, once every one is waiting
  local function idle_workers(pool, n, before)
    assert.truthy(H.wait_until(function()
      for slot = 1, n do if not ready(pool, slot) then return false end end
      return true
    end, 10))
    local pids = {}
    for _, pid in ipairs(H.children()) do
      if not before[pid] then pids[#pids + 1] = pid end
    end
    assert.are.equal(n, #pids)
    return pids
  end

  local function set(list)
    local t = {}
    for _, v in ipairs(list) do t[v] = true end
    return t
  end

  it("hold no fd of another pool or of their siblings", function()
    collectgarbage(); collectgarbage()
    local alone = mp.Pool(1)
    local n1 = fd_count(idle_workers(alone, 1, {})[1])
    alone:terminate()
    collectgarbage(); collectgarbage()
    local other = mp.Pool(6)               -- 6 channels, 6 sentinels, 2 more
    local before = set(H.children())
    local second = mp.Pool(3)
    local pids = idle_workers(second, 3, before)
    local counts = {}
    for i, pid in ipairs(pids) do counts[i] = fd_count(pid) end
    second:terminate()
    other:terminate()
    for i = 1, 3 do
      -- (a little slack: the parent's own fds may change in between)
      assert.is_true(counts[i] <= n1 + 2, ("%d fds alone, %d beside another pool"):format(n1, counts[i]))
    end
  end)

  it("ignore SIGINT, and run their first task after it", function()
    with_pool(1, function(pool)
      local pid = idle_workers(pool, 1, {})[1]
      core.kill(pid, 2)
      pool:poll(0.1)
      assert.are.equal(pid, pool:apply(function() return require("multiprocessing.core").getpid() end))
      assert.are.equal(0, pool:stats().restarts)
    end)
  end)

  it("leave at close and join, leaving no process behind", function()
    local before = set(H.children())
    local pool = mp.Pool(3)
    idle_workers(pool, 3, before)
    pool:close()
    pool:join()
    assert.are.equal(0, #H.children())
    assert.are.equal(0, pool:stats().restarts)
  end)

  it("are not upset by a pool collected before they started", function()
    do
      local gone = mp.Pool(2)
      gone:map(function(x) return x end, { 1, 2 })
      gone:terminate()
    end
    collectgarbage(); collectgarbage()     -- its PoolCore freed
    with_pool(2, function(pool)
      local r = pool:map(function(x) return x * 2 end, { 1, 2, 3, 4 }, 1)
      assert.are.same({ 2, 4, 6, 8 }, { r[1], r[2], r[3], r[4] })
      assert.are.equal(0, pool:stats().restarts)
    end)
  end)
end)

-- Ctrl-C (see H.interrupt_wait): the pool's wait gives way to it at once
-- (before, it went on until a result came, and pool:map only noticed when
-- it next looked: seconds later).
describe("SIGINT interrupts a blocked wait", function()
  H.leakcheck()
  local interrupt = H.interrupt_wait

  local function alive(pid)
    local f = io.open("/proc/" .. pid .. "/stat")
    if not f then return false end
    local s = f:read("a")
    f:close()
    return s:match("^%d+ %(.-%) Z") == nil
  end

  -- SIGINT ignored by process pid (its SigIgn mask)?
  local function ignores_sigint(pid)
    local f = io.open("/proc/" .. pid .. "/status")
    if not f then return nil end
    local mask = f:read("a"):match("SigIgn:%s*(%x+)")
    f:close()
    return mask ~= nil and tonumber(mask:sub(-1), 16) & 2 ~= 0
  end

  it("in pool:map in the parent of the pool; no worker survives it", function()
    local r, w = mp.Pipe(false)
    local code = interrupt(function(ready)
      local pool = mp.Pool(2)
      w:send({ pool._workers[1].pid, pool._workers[2].pid })
      ready()
      -- tasks of 0.5 s in chunks of 40: no result comes for 20 s, far
      -- beyond the join's 10 s (a wait that only looked at the signal when
      -- a result came would still be waiting)
      pool:map(function() require("multiprocessing.core").poll({}, 0.5) end,
               (function() local t = {} for i = 1, 160 do t[i] = i end return t end)(),
               { chunksize = 40 })
    end, 0.3)
    local pids = r:recv(5)
    assert.are.equal(1, code)
    assert.is_true(H.wait_until(function() return not alive(pids[1]) and not alive(pids[2]) end, 5))
    r:close(); w:close()
  end)

  it("in pool:map in the main program (the workers ignore it, and are killed with the pool)", function()
    -- (run_lua gives the program this process's module paths)
    local out, code = H.run_lua([[
      local mp = require "multiprocessing"
      local core = require "multiprocessing.core"
      local pool = mp.Pool(2)
      io.write("workers=", pool._workers[1].pid, ",", pool._workers[2].pid, "\n")
      io.flush()
      -- Ctrl-C half a second into the map
      local me = core.getpid()
      mp.Process{ target = function() core.poll({}, 0.5) core.kill(me, 2) end }:start()
      local t = {}
      for i = 1, 160 do t[i] = i end
      pool:map(function() require("multiprocessing.core").poll({}, 0.5) end, t, { chunksize = 40 })
      print("not interrupted")
    ]], 10)   -- no result comes for 20 s
    assert.are.equal(1, code, out)
    assert.truthy(out:find("interrupted!", 1, true), out)
    assert.is_nil(out:find("not interrupted", 1, true), out)
    local a, b = out:match("workers=(%d+),(%d+)")
    assert.truthy(a, out)
    assert.is_true(H.wait_until(function() return not alive(a) and not alive(b) end, 5))
  end)

  it("not in the workers, which ignore SIGINT", function()
    with_pool(2, function(pool)
      local r = pool:map(function(x) return x end, { 1, 2 }, { chunksize = 1 })
      assert.are.same({ 1, 2 }, { r[1], r[2] })
      -- (a worker sets it first thing; one that has not run yet may not
      -- have been scheduled)
      assert.is_true(H.wait_until(function()
        for _, w in pairs(pool._workers) do
          if not ignores_sigint(w.pid) then return false end
        end
        return true
      end, 5))
    end)
  end)

  it("and a map whose signal's handler raises nothing resumes and returns every result", function()
    local sig = core._test.nop_signal()
    local go <close> = mp.Event()
    local p = H.start(function()
      core._test.nop_signal(true)
      local pool = mp.Pool(2)
      go:set()
      local r = pool:map(function(x) require("multiprocessing.core").poll({}, 0.05) return x * 2 end,
                         { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20 },
                         { chunksize = 1 })
      pool:close()
      pool:join()
      local _, n = core._test.nop_signal()
      for i = 1, 20 do if r[i] ~= 2 * i then return 3 end end
      return n >= 5 and 0 or 4
    end)
    assert.is_true(go:wait(10))
    for _ = 1, 10 do H.sleep(0.03) core.kill(p.pid, sig) end
    assert.are.equal(0, H.finish(p))
  end)
end)
