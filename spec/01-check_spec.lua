-- Argument checks (multiprocessing.check) and the error rule: misuse
-- raises "bad argument #n to 'f' (...)" pointing at the caller's line;
-- the library's own failures raise error objects.
local H = require "helpers"
local mp = require "multiprocessing"
local check = require "multiprocessing.check"

-- The message of f's error, which must be a string.
local function message(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok)
  assert.is_string(err)
  return err
end

-- The same without its position (what the check functions, called
-- directly with level 0, put in it).
local function bare(f, ...)
  return (message(f, ...):gsub("^[^:]*:%d+: ", ""))
end

describe("check", function()
  it("takes integers as Lua does: 2.0 is 2, 1.5 and \"2\" are not integers", function()
    assert.are.equal(2, check.integer(2.0, 1, "f", "n", 0))
    assert.are.equal("integer", math.type(check.integer(2.0, 1, "f", "n", 0)))
    assert.is_nil(check.integer(nil, 1, "f", "n", 0))
    assert.are.equal("bad argument #1 to 'f' (n must be an integer >= 0, got 1.5)",
                     bare(check.integer, 1.5, 1, "f", "n", 0, nil, 0))
    assert.are.equal("bad argument #2 to 'f' (n must be an integer in 1..4, got string)",
                     bare(check.integer, "2", 2, "f", "n", 1, 4, 0))
    assert.are.equal("bad argument #1 to 'f' (integer in 1..4 expected, got 5)",
                     bare(check.integer, 5, 1, "f", nil, 1, 4, 0))
    assert.are.equal("bad argument #1 to 'f' (n must be an integer >= 0, got inf)",
                     bare(check.integer, math.huge, 1, "f", "n", 0, nil, 0))
  end)

  it("takes a timeout as the C core does: nil or a number >= 0, not NaN", function()
    assert.is_nil(check.timeout(nil, 1, "f"))
    assert.are.equal(0, check.timeout(0, 1, "f"))
    for _, bad in ipairs({ -1, 0 / 0, "1", true }) do
      assert.are.equal("bad argument #1 to 'f' (timeout must be a number >= 0)",
                       bare(check.timeout, bad, 1, "f", 0))
    end
    local q <close> = mp.Queue()          -- the C core's own check says the same
    local ok, err = pcall(q.get, q, -1)
    assert.is_false(ok)
    assert.truthy(err:find("(timeout must be a number >= 0)", 1, true), err)
  end)

  it("checks option tables: a table, known keys, declared types", function()
    local allowed = { a = true, f = "function", t = "callable" }
    local empty = check.options(nil, 2, "f", allowed)
    assert.is_nil(next(empty))
    assert.has_error(function() empty.x = 1 end)
    local o = { a = 1, f = print, t = setmetatable({}, { __call = print }) }
    assert.are.equal(o, check.options(o, 2, "f", allowed))
    assert.are.equal("bad argument #2 to 'f' (table expected, got number)",
                     bare(check.options, 5, 2, "f", allowed, 0))
    assert.are.equal("bad argument #2 to 'f' (unknown option 'b')",
                     bare(check.options, { b = 1 }, 2, "f", allowed, 0))
    assert.are.equal("bad argument #2 to 'f' ('f' must be a function, got number)",
                     bare(check.options, { f = 1 }, 2, "f", allowed, 0))
    assert.are.equal("bad argument #2 to 'f' ('t' must be a callable, got table)",
                     bare(check.options, { t = {} }, 2, "f", allowed, 0))
  end)

  it("names choices, types and extra arguments", function()
    assert.are.equal('bad argument #1 to \'f\' (method must be "a", "b" or "c", got d)',
                     bare(check.choice, "d", { "a", "b", "c" }, 1, "f", "method", 0))
    assert.are.equal("bad argument #1 to 'f' (boolean expected, got multiprocessing.Lock)",
                     bare(check.type, mp.Lock(), "boolean", 1, "f", nil, 0))
    assert.are.equal("bad argument #3 to 'f' (no value expected)",
                     bare(check.nargs, 3, 2, "f", 0))
    assert.are.equal("bad argument #1 to 'f' ('m' must be a number > 0, got 0)",
                     bare(check.positive, 0, 1, "f", "'m'", 0))
    assert.are.equal("bad argument #1 to 'f' ('m' must be a number >= 0, got nan)",
                     (bare(check.number, 0 / 0, 1, "f", "'m'", 0, 0):gsub("%-nan", "nan")))
  end)
end)

describe("argument errors", function()
  H.leakcheck()

  -- Each case is a one-line function whose call is misuse: the message
  -- must begin with this file and that line, then "bad argument #".
  local function points_here(case)
    local line = debug.getinfo(case, "S").linedefined
    local err = message(case)
    assert.truthy(err:match("01%-check_spec%.lua:" .. line .. ": bad argument #%d+ to '"), err)
  end

  it("point at the caller's line, for every module's functions", function()
    local cases = {
      function() mp.Queue(-1) end,
      function() mp.JoinableQueue(1, 2) end,
      function() mp.SimpleQueue(1) end,
      function() mp.Lock(1) end,
      function() mp.Semaphore(-1) end,
      function() mp.BoundedSemaphore(1.5) end,
      function() mp.Condition(5) end,
      function() mp.Event(1) end,
      function() mp.Barrier(0) end,
      function() mp.Barrier(2, 5) end,
      function() mp.Barrier(2, nil, -1) end,
      function() mp.Value("nope") end,
      function() mp.Value("int8", 300) end,
      function() mp.Value("int32", 1, { lokc = true }) end,
      function() mp.Array("int32", -1) end,
      function() mp.Array("uint8", { 1, 300 }) end,
      function() mp.Pipe("x") end,
      function() mp.wait(5) end,
      function() mp.wait({ {} }) end,
      function() mp.wait({}, -1) end,
      function() mp.Listener("") end,
      function() mp.Listener("127.0.0.1:99999") end,
      function() mp.Listener("127.0.0.1:0", { bogus = 1 }) end,
      function() mp.Listener("127.0.0.1:0", { backlog = 0 }) end,
      function() mp.Client("127.0.0.1:1", { authkey = 5 }) end,
      function() mp.Process(5) end,
      function() mp.Process{ targt = print } end,
      function() mp.Process{ start_method = "clone" } end,
      function() mp.get_context("spawn").Process(5) end,
      function() mp.set_start_method("vfork") end,
      function() mp.get_context("thread") end,
      function() mp.set_executable("") end,
      function() mp.set_main_chunk(3) end,
      function() mp.set_main_chunk("/no/such/file.lua") end,
      function() mp.set_forkserver_preload({ 1 }) end,
      function() mp.Pool(0) end,
      function() mp.Pool("2") end,
      function() mp.Pool{ processes = 1, bogus = 1 } end,
      function() mp.Pool{ max_memory_per_child = -1 } end,
    }
    for _, case in ipairs(cases) do points_here(case) end
  end)

  it("say which class a C method wants when it gets another object", function()
    local q <close> = mp.Queue()
    local jq <close> = mp.JoinableQueue()
    local a, b = mp.Pipe()
    local lock <close> = mp.Lock()
    local pool <close> = mp.Pool(1)
    local pc = pool._pc
    -- (the checks compare a size and a number, not the metatable: none of
    -- these may pass them)
    local others = { {}, io.stdout, lock, a, pc, 1, "x" }
    for _, o in ipairs(others) do
      if o ~= a then
        assert.truthy(bare(a.send, o, 1):match("^bad argument #1 to '[^']*' %(multiprocessing%.Connection expected"),
                      tostring(o))
      end
      assert.truthy(bare(q.put, o, 1):match("^bad argument #1 to '[^']*' %(Queue expected"), tostring(o))
      assert.truthy(bare(jq.task_done, o):match("^bad argument #1 to '[^']*' %(Queue expected"), tostring(o))
      if o ~= pc then
        assert.truthy(bare(pc.flush, o):match("^bad argument #1 to '[^']*' %(multiprocessing%.PoolCore expected"),
                      tostring(o))
      end
    end
    -- each queue class's methods take the others' objects where Python's do
    assert.is_true(q.put(jq, 7))
    assert.are.equal(7, jq:get(5))
    a:close(); b:close()
  end)

  it("point at the caller's line for methods written in Lua", function()
    local pool <close> = mp.Pool(1)
    local lock <close> = mp.Lock()
    local cond <close> = mp.Condition()
    local r = pool:apply_async(function() return 1 end)
    local cases = {
      function() pool:apply(5) end,
      function() pool:apply(print, 5) end,
      function() pool:apply_async(print, {}, { timeout = -1 }) end,
      function() pool:apply_async(print, {}, { callback = 1 }) end,
      function() pool:map(print, 5) end,
      function() pool:map(print, { 1 }, 0) end,
      function() pool:map(print, { 1 }, 2.5) end,
      function() pool:map(print, { 1 }, { bogus = 1 }) end,
      function() pool:map(print, { 1 }, { progress = 1 }) end,
      function() pool:starmap(print, { 1 }) end,
      function() pool:imap(print, { 1 }, "x") end,
      function() pool:imap_unordered(print, 5) end,
      function() pool:poll(-1) end,
      function() r:get(-1) end,
      function() r:wait("x") end,
      function() lock:with(5) end,
      function() cond:wait_for(5) end,
    }
    for _, case in ipairs(cases) do points_here(case) end
    assert.are.equal(1, r:get(10))
    assert.are.same({ 2, n = 1 }, pool:map(function(x) return x * 2 end, { 1 }, 1.0))
  end)

  it("say what is wrong in one form, naming options inside it", function()
    assert.are.equal("bad argument #1 to 'Pool' ('processes' must be an integer in 1..4096, got 0)",
                     bare(mp.Pool, 0))
    assert.are.equal("bad argument #1 to 'Process' (unknown option 'targt')",
                     bare(mp.Process, { targt = print }))
    assert.are.equal("bad argument #1 to 'Queue' (maxsize must be an integer >= 0, got -1)",
                     message(mp.Queue, -1))
    assert.are.equal("bad argument #1 to 'Semaphore' (value must be an integer in 0..2147483647, got -1)",
                     message(mp.Semaphore, -1))
  end)
end)

describe("the library's own failures", function()
  H.leakcheck()

  it("are error objects of errors.lua's classes", function()
    local p = mp.Process{ target = function() end }
    p:start()
    local ok, err = pcall(p.start, p)
    assert.is_false(ok)
    assert.is_true(mp.ProcessError:is(err))
    assert.are.equal(0, p:join(10))
    local pool = mp.Pool(1)
    local r = pool:apply_async(function() return 1 end)
    r:wait(10)
    pool:close()
    ok, err = pcall(pool.map, pool, print, { 1 })
    assert.is_false(ok)
    assert.is_true(mp.ProcessError:is(err))
    assert.is_number(pool:fileno())       -- closed, not joined: still there
    pool:join()
    ok, err = pcall(pool.fileno, pool)
    assert.is_false(ok)
    assert.is_true(mp.ProcessError:is(err))
  end)
end)
