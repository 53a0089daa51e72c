-- Futures: pool:submit, AsyncResult's done, cancel and add_done_callback,
-- mp.as_completed across pools, mp.wait with AsyncResults, and results
-- that make progress when asked without blocking (get(0), wait(0), ready).
local H = require "helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local METHODS = { "fork", "spawn", "forkserver" }

-- Run f(pool) with a pool of n workers started by method m, always
-- terminated afterwards (and the fork server stopped).
local function with_pool(m, n, f)
  local pool = mp.get_context(m).Pool(n)
  local ok, err = pcall(f, pool)
  pool:terminate()
  if m == "forkserver" then require("multiprocessing.spawn")._forkserver_stop() end
  if not ok then error(err, 0) end
end

-- Tasks. (They run in workers: only their upvalues travel with them.)
local function block_until(path)          -- returns once path exists (10 s at most)
  local c = require "multiprocessing.core"
  for _ = 1, 1000 do
    local f = io.open(path)
    if f then f:close() return true end
    c.poll({}, 0.01)
  end
  return false
end

local function mark(path)                  -- leaves a trace that it ran
  local f = assert(io.open(path, "w"))
  f:write("ran")
  f:close()
  return "marked"
end

local function exists(path)
  local f = io.open(path)
  if f then f:close() end
  return f ~= nil
end

local function touch(path) assert(io.open(path, "w")):close() end

local function sleep_then(t, v)
  require("multiprocessing.core").poll({}, t)
  return v
end

-- Run f(pool, blocked, open) with a pool of n workers (as with_pool,
-- forked): blocked is the pool's first task, which returns true once
-- open() was called (false after 10 s).
local function with_blocked(n, f)
  local gate = H.tmpname("gate")
  local ok, err = pcall(with_pool, "fork", n, function(pool)
    f(pool, pool:submit(block_until, gate), function() touch(gate) end)
  end)
  os.remove(gate)
  if not ok then error(err, 0) end
end

for _, m in ipairs(METHODS) do
  describe("futures under " .. m, function()
    H.leakcheck()

    it("submit(fn, ...) passes every argument, nils included", function()
      with_pool(m, 2, function(pool)
        local r = pool:submit(function(...) return select("#", ...), ... end, 1, nil, "x", nil)
        local n, a, b, c, d = r:get(10)
        assert.are.equal(4, n)
        assert.are.same({ 1, nil, "x", nil }, { a, b, c, d })
        assert.are.equal(7, pool:submit(function() return 7 end):get(10))
      end)
    end)

    it("cancel removes a queued task, which never runs; get raises CancelledError", function()
      local gate, trace = H.tmpname("gate"), H.tmpname("trace")
      with_pool(m, 1, function(pool)
        local busy = pool:submit(block_until, gate)
        local queued = pool:submit(mark, trace)
        assert.is_false(queued:done())
        assert.is_true(queued:cancel())
        assert.is_true(queued:done())
        assert.is_true(queued:ready())
        assert.is_false(queued:successful())
        assert.are.equal("<AsyncResult(cancelled)>", tostring(queued))
        local ok, err = pcall(queued.get, queued, 0)
        assert.is_false(ok)
        assert.is_true(mp.CancelledError:is(err), tostring(err))
        assert.is_true(mp.Error:is(err))
        assert.is_false(queued:cancel())          -- done already
        assert.is_false(busy:cancel())            -- handed to the worker
        touch(gate)
        assert.is_true(busy:get(10))
        -- one worker, first in first out: a task submitted after the
        -- cancelled one has run, and the cancelled one never did
        assert.are.equal(3, pool:submit(function() return 3 end):get(10))
        assert.is_false(exists(trace))
        assert.is_false(busy:cancel())            -- finished
        local st = pool:stats()
        assert.are.equal(0, st.queued)
      end)
      os.remove(gate)
    end)
  end)
end

describe("futures", function()
  H.leakcheck()

  it("submit names itself in argument errors and refuses what cannot travel", function()
    with_pool("fork", 1, function(pool)
      local ok, err = pcall(function() local r = pool:submit(42); return r end)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("bad argument #1 to 'submit' (function expected, got number)",
                                       1, true), tostring(err))
      assert.truthy(tostring(err):find("15-futures_spec.lua", 1, true), tostring(err))
      ok, err = pcall(pool.submit, pool, print, io.stdout)
      assert.is_false(ok)
      assert.is_true(mp.SerializationError:is(err), tostring(err))
    end)
  end)

  it("done is false while the task runs and true once it finished or failed", function()
    with_blocked(1, function(pool, r, open)
      assert.is_false(r:done())
      open()
      assert.is_true(r:wait(10))
      assert.is_true(r:done())
      local bad = pool:submit(error, "task broke")
      assert.is_true(bad:wait(10))
      assert.is_true(bad:done())
      assert.is_false(bad:successful())
    end)
  end)

  it("cancel of a running task is false and the task finishes", function()
    with_blocked(1, function(_, r, open)
      -- wait until the worker has taken it: its result can only come after
      assert.is_false(r:wait(0.2))
      assert.is_false(r:cancel())
      open()
      assert.is_true(r:get(10))
    end)
  end)

  it("a cancelled task's error_callback and done callbacks get CancelledError", function()
    with_blocked(1, function(pool, busy, open)
      local got
      local r = pool:apply_async(function() return 1 end, {}, {
        callback = function() error("not called") end,
        error_callback = function(e) got = e end })
      local seen
      r:add_done_callback(function(x) seen = x end)
      assert.is_true(r:cancel())
      pool:poll()
      assert.is_true(mp.CancelledError:is(got), tostring(got))
      assert.are.equal(r, seen)
      open()
      assert.is_true(busy:get(10))
    end)
  end)

  it("cancel of a map cancels the chunks not handed out; the others run", function()
    local dir = H.tmpname("items")
    with_blocked(1, function(pool, busy, open)
      local paths = {}
      for i = 1, 20 do paths[i] = dir .. "-" .. i end
      local r = pool:map_async(mark, paths, 1)
      assert.is_true(r:cancel())
      assert.is_false(r:cancel())               -- nothing left to cancel
      open()
      assert.is_true(busy:get(10))
      assert.is_true(r:wait(10))
      local ok, err = pcall(r.get, r)
      assert.is_false(ok)
      assert.is_true(mp.CancelledError:is(err), tostring(err))
      local ran = 0
      for i = 1, 20 do
        if exists(paths[i]) then
          ran = ran + 1
          os.remove(paths[i])
        end
      end
      assert.is_true(ran < 20, "cancelled items ran")
      local st = pool:stats()
      assert.are.equal(0, st.queued)
      assert.are.equal(21, st.done)             -- cancelled items count as done
    end)
  end)

  it("add_done_callback: once, with the result, from the owner's pool calls", function()
    with_pool("fork", 2, function(pool)
      local calls = {}
      local r = pool:submit(sleep_then, 0.05, "v")
      r:add_done_callback(function(x) calls[#calls + 1] = { "a", x, core.getpid() } end)
      r:add_done_callback(function(x) calls[#calls + 1] = { "b", x } end)
      assert.are.equal(0, #calls)
      assert.are.equal("v", r:get(10))
      assert.are.equal(2, #calls)
      assert.are.equal("a", calls[1][1])
      assert.are.equal(r, calls[1][2])
      assert.are.equal(core.getpid(), calls[1][3])
      assert.are.equal("b", calls[2][1])
      pool:poll(0.05)
      assert.are.equal(2, #calls)               -- once
      -- already done: at once
      r:add_done_callback(function(x) calls[#calls + 1] = { "c", x } end)
      assert.are.equal(3, #calls)
      -- a failed task too
      local bad = pool:submit(error, "broke")
      local failed
      bad:add_done_callback(function(x) failed = x end)
      assert.is_true(bad:wait(10))
      assert.are.equal(bad, failed)
      assert.has_error(function() r:add_done_callback(5) end,
                       "bad argument #1 to 'add_done_callback' (function expected, got number)")
    end)
  end)

  it("add_done_callback: an error comes out of the call that ran it; the rest run later", function()
    with_pool("fork", 1, function(pool)
      local r = pool:submit(function() return 1 end)
      local later = false
      r:add_done_callback(function() error("callback broke") end)
      r:add_done_callback(function() later = true end)
      local ok, err = pcall(r.get, r, 10)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("callback broke", 1, true))
      assert.is_false(later)
      pool:poll()
      assert.is_true(later)
      assert.are.equal(1, r:get(0))
      assert.are.equal(2, pool:apply(function() return 2 end))
    end)
  end)

  it("terminate runs the done callbacks of the tasks it fails", function()
    local gate = H.tmpname("gate")
    local pool = mp.Pool(1)
    local r = pool:submit(block_until, gate)
    local q = pool:submit(mark, H.tmpname("never"))
    local seen = {}
    r:add_done_callback(function(x) seen[#seen + 1] = x end)
    q:add_done_callback(function(x) seen[#seen + 1] = x end)
    pool:terminate()
    assert.are.equal(2, #seen)
    local ok, err = pcall(r.get, r)
    assert.is_false(ok)
    assert.is_true(mp.ProcessError:is(err), tostring(err))
    assert.is_nil(r:pollfd())                   -- the pool's fd is gone
    assert.are.equal(0, r:timeout())
    assert.has_error(function() r:fileno() end)
  end)

  it("cancel is refused in a forked child: the pool is its parent's", function()
    with_pool("fork", 1, function(pool)
      local r = pool:submit(sleep_then, 0.1, 1)
      local p = H.start(function()
        local ok, err = pcall(r.cancel, r)
        return (not ok and mp.ProcessError:is(err)) and 0 or 3
      end)
      assert.are.equal(0, H.finish(p, 10))
      assert.are.equal(1, r:get(10))
    end)
  end)
end)

describe("as_completed", function()
  H.leakcheck()

  it("gives the results in the order they finish, across pools", function()
    with_pool("fork", 1, function(p1)
      with_pool("spawn", 1, function(p2)
        local gate1, gate2 = H.tmpname("g1"), H.tmpname("g2")
        local a = p1:submit(block_until, gate1)
        local b = p2:submit(block_until, gate2)
        local c = p1:submit(function() return "c" end)   -- after a, on p1's one worker
        touch(gate2)                                     -- b finishes first
        local order = {}
        for r, i in mp.as_completed({ a, b, c }, 30) do
          order[#order + 1] = i
          if r == b then touch(gate1) end                -- then a, then c
        end
        assert.are.same({ 2, 1, 3 }, order)
        os.remove(gate1); os.remove(gate2)
      end)
    end)
  end)

  it("gives the finished ones first, in their finishing order, each result once", function()
    with_pool("fork", 2, function(pool)
      local r1 = pool:submit(function() return 1 end)
      local r2 = pool:submit(function() return 2 end)
      assert.are.equal(2, r2:get(10))
      assert.are.equal(1, r1:get(10))
      local r3 = pool:submit(function() return 3 end)
      local got = {}
      for r in mp.as_completed({ r3, r1, r2, r1 }) do got[#got + 1] = r end
      assert.are.equal(3, #got)
      assert.are.equal(r3, got[3])
      assert.is_true(got[1] == r1 or got[1] == r2)
      for _ in mp.as_completed({}) do error("no result to give") end
    end)
  end)

  it("raises TimeoutError when the timeout runs out with results left", function()
    local gate = H.tmpname("gate")
    with_pool("fork", 2, function(pool)
      local quick = pool:submit(function() return "q" end)
      local slow = pool:submit(block_until, gate)
      local got = {}
      local ok, err = pcall(function()
        for r in mp.as_completed({ slow, quick }, 0.3) do got[#got + 1] = r end
      end)
      assert.is_false(ok)
      assert.is_true(mp.TimeoutError:is(err), tostring(err))
      assert.truthy(err.message:find("1 (of 2) results unfinished", 1, true), err.message)
      assert.are.same({ quick }, got)
      touch(gate)
      assert.is_true(slow:get(10))
    end)
    os.remove(gate)
  end)

  it("checks its arguments", function()
    assert.has_error(function() mp.as_completed(5) end,
                     "bad argument #1 to 'as_completed' (table expected, got number)")
    assert.has_error(function() mp.as_completed({ {} }) end,
                     "bad argument #1 to 'as_completed' (results[1] is not an AsyncResult: table)")
    assert.has_error(function() mp.as_completed({}, -1) end)
  end)
end)

describe("results make progress when asked without blocking", function()
  H.leakcheck()

  it("get(0), wait(0) and ready() take in the news the pool's fd announced", function()
    with_pool("fork", 1, function(pool)
      for _, ask in ipairs {
        function(r) return r:get(0) == "x" end,
        function(r) return r:wait(0) end,
        function(r) return r:ready() end,
        function(r) return r:done() end,
      } do
        local r = pool:submit(function() return "x" end)
        local fd, got = r:fileno(), false
        for _ = 1, 50 do                        -- readable: try now
          assert.are.same({ 1 }, core.poll({ fd }, 10))
          got = ask(r)
          if got then break end
        end
        assert.is_true(got)
        assert.are.equal(0, r:timeout())
      end
    end)
  end)

  it("mp.wait takes AsyncResults and returns the ready ones", function()
    with_blocked(2, function(pool, slow, open)
      local quick = pool:submit(function() return 1 end)
      local a, b <close> = mp.Pipe()
      local ready = mp.wait({ slow, quick, a }, 10)
      assert.are.same({ quick }, ready)
      assert.are.same({}, mp.wait({ slow, a }, 0.1))
      open()
      assert.are.same({ slow }, mp.wait({ slow, a }, 10))
      b:send("x")
      assert.are.same({ a }, mp.wait({ a }, 10))
      -- those ready at once are returned without waiting for the others
      assert.are.same({ slow, quick }, mp.wait({ slow, quick, a }, 10))
      a:close()
    end)
  end)
end)
