-- The cluster pool (docs/cluster.md): the Redis C module, the Pool API
-- against a local Pool's results, and one spec per row of the failure
-- table. Each block starts its own redis-server on a temporary Unix socket
-- and stops it; "machines" are bin/mp-worker processes, each the leader of
-- its own session and process group (setsid), killed as whole groups.
local helpers = require "spec.helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local have_redis = os.execute("command -v redis-server >/dev/null 2>&1")
  and pcall(require, "multiprocessing.redis")
if not have_redis then
  describe("cluster", function()
    it("needs redis-server and the redis module", function()
      pending("redis-server or multiprocessing.redis missing (make deps; make)")
    end)
  end)
  return
end

local cluster = require "multiprocessing.cluster"
local redis = require "multiprocessing.redis"
local wire = require "multiprocessing.cluster.wire"
local cqueues = require "cqueues"
-- cqueues' poller for calls outside a loop holds fds for the life of the
-- process: make it now, before the leak checks.
cqueues.poll(0)

local function sh(cmd)
  local p = io.popen(cmd .. " 2>&1")
  local out = p:read("a")
  p:close()
  return out
end

local start_redis = helpers.start_redis

local here = sh("pwd"):gsub("\n$", "")
local keyfiles = {}
local function remove_keyfiles()
  for k, path in pairs(keyfiles) do os.remove(path); keyfiles[k] = nil end
end
local function keyfile(key)
  if not keyfiles[key] then
    keyfiles[key] = helpers.tmpname("key")
    local f = assert(io.open(keyfiles[key], "w")); f:write(key); f:close()
  end
  return keyfiles[key]
end

-- Every machine started, so that an after_each stops those a failed
-- assertion left running.
local started = {}
local function stop_machines()
  for i = #started, 1, -1 do started[i].stop(); started[i] = nil end
end

-- Start a machine: bin/mp-worker in a session of its own. Returns
-- {pgid=, log=}.
local function machine(rs, name, o)
  o = o or {}
  local log = helpers.tmpname("machine-" .. name)
  local pidf = log .. ".pid"
  local cmd = ("LUA_PATH=%q LUA_CPATH=%q setsid -f sh -c 'echo $$ > %s; exec lua5.4 %s/bin/mp-worker " ..
               "--redis %s --queue %s --processes %d --authkey-file %s --machine %s --verbose' >%s 2>&1")
              :format(package.path, package.cpath, pidf, here, rs.url, o.queue or "q",
                      o.processes or 2, keyfile(o.authkey or "k"), name, log)
  assert(os.execute(cmd))
  local m = { log = log, name = name }
  assert(helpers.wait_until(function()
    local f = io.open(pidf)
    m.pgid = f and tonumber(f:read("l"))
    if f then f:close() end
    return m.pgid
  end, 5))
  function m.kill(sig)
    os.execute(("/bin/kill -s %s -- -%d 2>/dev/null"):format(sig or "KILL", m.pgid))
  end
  function m.alive()
    return os.execute(("/bin/kill -0 -- -%d 2>/dev/null"):format(m.pgid)) == true
  end
  function m.stop()                         -- Ctrl-C: a clean stop
    if m.stopped then return end            -- (its pgid may be another's now)
    m.stopped = true
    if m.alive() then core.kill(m.pgid, 2) end
    if not helpers.wait_until(function() return not m.alive() end, 10) then m.kill() end
    helpers.wait_until(function() return not m.alive() end, 5)
    os.remove(pidf); os.remove(log)
  end
  function m.output()
    local f = io.open(log)
    local s = f and f:read("a") or ""
    if f then f:close() end
    return s
  end
  started[#started + 1] = m
  return m
end

-- Wait until the queue's heartbeats show n workers.
local function wait_workers(rs, n, queue)
  local conn = require "multiprocessing.cluster.conn"
  local c = conn.new(rs.url)
  local ok = helpers.wait_until(function()
    local _, w = wire.alive(c, wire.keys(queue or "q"))
    return w >= n
  end, 15)
  c:close()
  return ok
end

-- The machine "m1" with one worker, once that worker serves.
local function one_worker(rs)
  local m1 = machine(rs, "m1", { processes = 1 })
  assert(wait_workers(rs, 1))
  return m1
end

local function keys(rs)
  local c = rs.cli()
  local k = c:command("KEYS", "*")
  c:close()
  table.sort(k)
  return k
end

describe("multiprocessing.redis", function()
  local rs
  setup(function() rs = start_redis() end)
  teardown(function() rs.stop() end)

  it("sends any bytes and converts replies", function()
    local c = rs.cli()
    assert.equal("OK", c:command("SET", "k\0x", "v\0\1\255"))
    assert.equal("v\0\1\255", c:command("GET", "k\0x"))
    assert.is_nil(c:command("GET", "nokey"))
    assert.equal(2, c:command("RPUSH", "l", 1, 2.5))
    local t = c:command("MGET", "k\0x", "nokey")
    assert.same({ "v\0\1\255", false, n = 2 }, t)
    local r, msg, kind = c:command("NOSUCHCOMMAND")
    assert.is_nil(r); assert.matches("unknown command", msg); assert.equal("error", kind)
    c:command("DEL", "k\0x", "l")
    c:close()
  end)

  it("pipelines and bounds a wait", function()
    local c = rs.cli()
    c:append("INCR", "n"):append("INCR", "n")
    assert.equal(2, c:pending())
    assert.equal(1, c:recv()); assert.equal(2, c:recv(1))
    c:append("BLPOP", "empty", 1)
    assert.same({ nil, "timeout" }, { c:recv(0.05) })
    assert.is_nil(c:recv(5))                 -- BLPOP's own timeout: a nil reply
    assert.error_matches(function() c:recv() end, "no reply is expected")
    c:command("DEL", "n")
    c:close()
  end)

  it("reports a failed connection, and a closed one raises", function()
    local c, err = redis.connect{ path = "/nonexistent/sock" }
    assert.is_nil(c); assert.matches("No such file", err)
    c, err = redis.connect{ host = "127.0.0.1", port = 1 }
    assert.is_nil(c); assert.matches("refused", err)
    assert.error_matches(function() redis.connect{ port = 0 } end, "port")
    c = rs.cli()
    assert.matches("^<Redis%(fd %d+%)>$", tostring(c))
    c:close(); c:close()
    assert.equal("<Redis(closed)>", tostring(c))
    assert.error_matches(function() c:command("PING") end, "closed")
    local d = rs.cli(); d = nil            -- luacheck: ignore (left to __gc)
    collectgarbage(); collectgarbage()
  end)

  it("reports a connection that broke as io, and closes it", function()
    local c = rs.cli()
    local killer = rs.cli()
    local id = c:command("CLIENT", "ID")
    killer:command("CLIENT", "KILL", "ID", id)
    killer:close()
    local r, _, kind = c:command("PING")
    assert.is_nil(r); assert.equal("io", kind)
    assert.is_true(c:closed())
  end)

  it("parses URLs and refuses rediss://", function()
    local conn = require "multiprocessing.cluster.conn"
    assert.same({ host = "10.0.0.5", port = 6380, db = 2, user = "u", password = "p@ss" },
                conn.parse("redis://u:p%40ss@10.0.0.5:6380/2"))
    assert.same({ host = "h", port = 6379, password = "pw" }, conn.parse("redis://pw@h"))
    assert.same({ path = "/tmp/x.sock", db = 3 }, conn.parse("unix:///tmp/x.sock?db=3"))
    assert.error_matches(function() conn.parse("rediss://h") end, "TLS")
    assert.error_matches(function() conn.parse("http://h") end, "bad redis URL")
  end)
end)

describe("cluster.Pool", function()
  local rs, m1, m2
  setup(function()
    rs = start_redis()
    m1 = machine(rs, "m1")
    m2 = machine(rs, "m2")
    assert(wait_workers(rs, 4), "machines did not start")
  end)
  teardown(function()
    m1.stop(); m2.stop()
    rs.stop()
    remove_keyfiles()
  end)
  helpers.leakcheck()

  it("gives the local Pool's results (closures with upvalues)", function()
    local base, tag = 100, "t"
    local function f(x) return x + base, tag .. x end
    local xs = {}
    for i = 1, 50 do xs[i] = i end
    local lp <close> = mp.Pool(2)
    local pool <close> = cluster.Pool{ redis = rs.url, queue = "q", authkey = "k" }
    assert.same({ lp:apply(f, { 7 }) }, { pool:apply(f, { 7 }) })
    assert.same(lp:map(f, xs), pool:map(f, xs))
    assert.same(lp:map(f, xs, 7), pool:map(f, xs, 7))
    assert.same(lp:starmap(math.max, { { 1, 5 }, { 9, 2 } }), pool:starmap(math.max, { { 1, 5 }, { 9, 2 } }))
    local a, b = {}, {}
    for i, v, w in lp:imap(f, xs, 3) do a[#a + 1] = { i, v, w } end
    for i, v, w in pool:imap(f, xs, 3) do b[#b + 1] = { i, v, w } end
    assert.same(a, b)
    local seen = {}
    for i, v in pool:imap_unordered(f, xs, 4) do seen[i] = v end
    for i = 1, 50 do assert.equal(i + base, seen[i]) end
    assert.same(pool:map(f, {}), lp:map(f, {}))
    local got
    local r = pool:map_async(f, { 1, 2 }, { callback = function(l) got = l end })
    assert.same({ 101, 102, n = 2 }, r:get(10))
    assert.same({ 101, 102, n = 2 }, got)
    assert.equal(9, pool:submit(function(x) return x * x end, 3):get(10))
    local r2 = pool:apply_async(function() return nil, 2 end)
    assert.is_true(r2:wait(10)); assert.is_true(r2:successful())
    assert.same({ nil, 2 }, { r2:get() })
    pool:close(); pool:join()
    assert.error_matches(function() pool:apply(f, { 1 }) end, "not running")
  end)

  it("raises a task's error as the local Pool does", function()
    local pool <close> = cluster.Pool{ redis = rs.url, queue = "q", authkey = "k" }
    local ok, e = pcall(pool.apply, pool, function() error("boom") end)
    assert.is_false(ok)
    assert.is_true(mp.RemoteError:is(e))
    assert.matches("boom", e.message)
    local errd
    local r = pool:apply_async(function() error({ code = 1 }) end, {}, { error_callback = function(x) errd = x end })
    assert.has_error(function() r:get(10) end)
    assert.is_true(mp.RemoteError:is(errd))
    ok, e = pcall(pool.map, pool, function(x) if x == 5 then error("five") end return x end,
                  { 1, 2, 3, 4, 5, 6 }, 2)
    assert.is_false(ok); assert.matches("five", e.message)
    assert.error_matches(function() pool:apply(42) end, "function expected")
    assert.error_matches(function() cluster.Pool{ redis = rs.url, queue = "q", authkey = "k", nope = 1 } end,
                         "unknown option 'nope'")
    -- every option is checked before Redis is asked anything
    local function opts(extra)
      local o = { redis = rs.url, queue = "q", authkey = "k" }
      for k, v in pairs(extra) do o[k] = v end
      return o
    end
    for _, case in ipairs({
      { { retry_for = -1 }, "'retry_for' must be a number >= 0, got %-1" },
      { { retry_for = "x" }, "'retry_for' must be a number >= 0, got string" },
      { { max_retries = 1.5 }, "'max_retries' must be an integer >= 0, got 1.5" },
      { { lease = 0 }, "'lease' must be a number >= 1, got 0" },
      { { queue = 5 }, "'queue' must be a string" },
      { { authkey = false }, "'authkey' must be a string" },
    }) do
      assert.error_matches(function() cluster.Pool(opts(case[1])) end,
                           "^bad argument #1 to 'Pool' %(" .. case[2], nil)
    end
    assert.error_matches(function() cluster.Pool{ redis = rs.url, queue = "q" } end,
                         "'authkey' is required")
    assert.error_matches(function() cluster.Pool("redis://x") end, "options table expected, got string")
    pool:close(); pool:join()
  end)

  it("kills a task past its timeout, and its machine goes on", function()
    local pool <close> = cluster.Pool{ redis = rs.url, queue = "q", authkey = "k" }
    local r = pool:apply_async(function() while true do end end, {}, { timeout = 0.5 })
    local ok, e = pcall(r.get, r, 20)
    assert.is_false(ok)
    assert.is_true(mp.TimeoutError:is(e))
    assert.equal(5, pool:apply(function(x) return x end, { 5 }))
    pool:close(); pool:join()
  end)

  it("sends each result to its own client, once", function()
    local p1 <close> = cluster.Pool{ redis = rs.url, queue = "q", authkey = "k" }
    local p2 <close> = cluster.Pool{ redis = rs.url, queue = "q", authkey = "k" }
    local r1 = p1:map_async(function(x) return "a" .. x end, { 1, 2, 3, 4 }, 1)
    local r2 = p2:map_async(function(x) return "b" .. x end, { 1, 2, 3, 4 }, 1)
    assert.same({ "b1", "b2", "b3", "b4", n = 4 }, r2:get(20))
    assert.same({ "a1", "a2", "a3", "a4", n = 4 }, r1:get(20))
    -- a second, correctly signed result for a task already done: dropped
    local c = rs.cli()
    local m = mp.dumps({ t = 1, r = { "forged", n = 1 } })
    c:command("XADD", p1._rkey, "*", "t", 1, "m", m, "s", wire.sign("k", m))
    c:close()
    local r3 = p1:apply_async(function() return "fresh" end)
    assert.equal("fresh", r3:get(20))
    assert.equal(5, p1:stats().done)
    p1:close(); p1:join(); p2:close(); p2:join()
  end)

  it("counts machines and workers from their heartbeats", function()
    local pool <close> = cluster.Pool{ redis = rs.url, queue = "q", authkey = "k" }
    local st = pool:stats()
    assert.equal(2, st.machines); assert.equal(4, st.workers)
    pool:map(function(x) return x end, { 1, 2, 3 }, 1)
    local done, total, workers = pool:progress()
    assert.equal(3, done); assert.equal(3, total); assert.equal(4, workers)
    pool:close(); pool:join()
  end)
end)

-- The futures and the polling protocol: the AsyncResult is the local
-- Pool's (pool_results.lua). The queue "idle" has no worker: its tasks stay
-- in the stream, and a stand-in consumer ("spec") takes some of them.
describe("cluster futures and event loops", function()
  local rs, m1
  setup(function()
    rs = start_redis()
    m1 = machine(rs, "m1")
    assert(wait_workers(rs, 2), "the machine did not start")
  end)
  teardown(function()
    m1.stop()
    rs.stop()
    remove_keyfiles()
  end)
  helpers.leakcheck()

  local IDLE = "mp:{idle}:tasks"

  local function wait_for(path)           -- a task: returns once path exists (10 s at most)
    local c = require "multiprocessing.core"
    for _ = 1, 1000 do
      local f = io.open(path)
      if f then f:close() return "went" end
      c.poll({}, 0.01)
    end
  end

  -- Answer task entry e (read by the stand-in consumer) with results r,
  -- signed as a worker would.
  local function answer(pool, e, r)
    local f = wire.fields(e[2])
    local m = mp.dumps({ t = math.tointeger(tonumber(f.t)), r = r })
    local c = rs.cli()
    c:command("XADD", pool._rkey, "*", "t", f.t, "m", m, "s", wire.sign("k", m))
    c:command("XACK", IDLE, "workers", e[1])
    c:command("XDEL", IDLE, e[1])
    c:close()
  end

  it("submit(fn, ...) gives the arguments as they are, as the local Pool's", function()
    local lp <close> = mp.Pool(1)
    local pool <close> = cluster.Pool{ redis = rs.url, queue = "q", authkey = "k" }
    local function f(...) return select("#", ...), ... end
    local want = { lp:submit(f, 1, nil, "x", nil):get(10) }
    assert.same({ 4, 1, nil, "x", nil }, want)
    assert.same(want, { pool:submit(f, 1, nil, "x", nil):get(10) })
    assert.same({ 0 }, { pool:submit(f):get(10) })
    assert.error_matches(function() pool:submit(42) end,
                         "bad argument #1 to 'submit' %(function expected, got number%)")
    assert.equal(getmetatable(lp:submit(f)), getmetatable(pool:submit(f)))   -- one class
    pool:close(); pool:join()
  end)

  it("done, and add_done_callback: called once, from the pool's calls", function()
    local pool <close> = cluster.Pool{ redis = rs.url, queue = "q", authkey = "k" }
    local flag = helpers.tmpname("go")
    local r = pool:submit(wait_for, flag)
    local calls = {}
    r:add_done_callback(function(x) calls[#calls + 1] = { "first", x } end)
    r:add_done_callback(function(x) calls[#calls + 1] = { "second", x } end)
    assert.is_false(r:done())
    assert.same({}, calls)
    assert.equal("<AsyncResult(pending)>", tostring(r))
    local f = assert(io.open(flag, "w")); f:close()
    assert.equal("went", r:get(10))
    assert.is_true(r:done())
    assert.same({ { "first", r }, { "second", r } }, calls)
    r:add_done_callback(function(x) calls[#calls + 1] = { "late", x } end)   -- at once
    assert.same({ "late", r }, calls[3])
    assert.is_true(r:successful())
    assert.error_matches(function() r:add_done_callback(1) end,
                         "bad argument #1 to 'add_done_callback' %(function expected, got number%)")
    -- a failed map: its done callback too, after its error_callback
    local seen = {}
    local m = pool:map_async(function(x) if x == 2 then error("two") end return x end,
                             { 1, 2, 3 }, { chunksize = 1, error_callback = function(e)
                               seen[#seen + 1] = e.message end })
    m:add_done_callback(function(x) seen[#seen + 1] = x end)
    assert.is_true(m:wait(10))
    assert.matches("two", seen[1]); assert.equal(m, seen[2])
    assert.is_false(m:successful())
    os.remove(flag)
    pool:close(); pool:join()
  end)

  it("cancel: a task still in the stream is deleted and raises CancelledError", function()
    local pool <close> = cluster.Pool{ redis = rs.url, queue = "idle", authkey = "k" }
    local errd, called
    local r = pool:apply_async(function() return 1 end, {}, { error_callback = function(e) errd = e end })
    r:add_done_callback(function(x) called = x end)
    local c = rs.cli()
    assert.equal(1, c:command("XLEN", IDLE))
    assert.is_true(r:cancel())
    assert.equal(0, c:command("XLEN", IDLE))  -- gone from the stream: no worker will run it
    assert.is_false(r:cancel())
    assert.is_true(r:done()); assert.is_false(r:successful())
    assert.equal("<AsyncResult(cancelled)>", tostring(r))
    local ok, e = pcall(r.get, r, 0)
    assert.is_false(ok); assert.is_true(mp.CancelledError:is(e))
    assert.is_nil(called)                     -- callbacks run from the pool's calls
    assert.equal(0, pool:poll(0))
    assert.equal(r, called); assert.is_true(mp.CancelledError:is(errd))
    local st = pool:stats()
    assert.equal(1, st.done); assert.equal(1, st.failed); assert.equal(0, st.queued)
    -- poll counts unfinished jobs, as the local Pool's does; stats, tasks
    local m2 = pool:map_async(function(x) return x end, { 1, 2, 3, 4, 5, 6 }, 2)
    local a2 = pool:apply_async(function() return 1 end, {})
    assert.equal(2, pool:poll(0))
    assert.equal(4, pool:stats().queued)
    assert.is_true(m2:cancel()); assert.is_true(a2:cancel())
    assert.equal(0, pool:poll(0))
    -- a task delivered to a worker is not cancelled
    c:command("XGROUP", "CREATE", IDLE, "workers", "0", "MKSTREAM")
    local a, b = pool:submit(function() return "a" end), pool:submit(function() return "b" end)
    local got = c:command("XREADGROUP", "GROUP", "workers", "spec", "COUNT", 1, "STREAMS", IDLE, ">")
    assert.is_false(a:cancel())               -- delivered: it runs
    assert.is_true(b:cancel())
    assert.equal(1, c:command("XLEN", IDLE))
    answer(pool, got[1][2][1], { "a", n = 1 })
    assert.equal("a", a:get(10))
    assert.is_true(mp.CancelledError:is(select(2, pcall(b.get, b))))
    c:close()
    pool:close(); pool:join()
  end)

  it("cancel of a map: the chunks no worker took fail, the others run", function()
    local pool <close> = cluster.Pool{ redis = rs.url, queue = "idle", authkey = "k" }
    local c = rs.cli()
    c:command("XGROUP", "CREATE", IDLE, "workers", "0", "MKSTREAM")
    local r = pool:map_async(function(x) return x end, { 1, 2, 3, 4 }, 1)
    local got = c:command("XREADGROUP", "GROUP", "workers", "spec", "COUNT", 2, "STREAMS", IDLE, ">")
    assert.is_true(r:cancel())
    assert.is_false(r:done())                 -- two chunks are a worker's
    assert.equal(0, c:command("XLEN", IDLE) - 2)
    for i, e in ipairs(got[1][2]) do answer(pool, e, { { i * 10, n = 1 } }) end
    local ok, e = pcall(r.get, r, 10)
    assert.is_false(ok); assert.is_true(mp.CancelledError:is(e))
    assert.is_false(r:cancel())
    local st = pool:stats()
    assert.equal(4, st.done); assert.equal(2, st.failed)
    c:close()
    pool:close(); pool:join()
  end)

  it("terminate fails a pending task: its done callback runs", function()
    local pool = cluster.Pool{ redis = rs.url, queue = "idle", authkey = "k" }
    local r = pool:submit(function() return 1 end)
    local called
    r:add_done_callback(function(x) called = x end)
    pool:terminate()
    assert.equal(r, called)
    assert.is_true(r:done()); assert.is_nil(r:pollfd()); assert.equal(0, r:timeout())
    assert.has_error(function() r:fileno() end)
    local ok, e = pcall(r.get, r)
    assert.is_false(ok); assert.matches("terminated", e.message)
    assert.is_false(r:cancel())
    local c = rs.cli()
    assert.equal(0, c:command("XLEN", IDLE))
    c:close()
  end)

  it("as_completed across a local pool and a cluster pool", function()
    local lp <close> = mp.Pool(1)
    local pool <close> = cluster.Pool{ redis = rs.url, queue = "q", authkey = "k" }
    local idle <close> = cluster.Pool{ redis = rs.url, queue = "idle", authkey = "k" }
    local function f(x) return x end
    -- finished already: they come in the order they finished, whatever the pool
    local c1, l1 = pool:submit(f, "c1"), lp:submit(f, "l1")
    assert.equal("c1", c1:get(10)); assert.equal("l1", l1:get(10))
    local order = {}
    for r, i in mp.as_completed({ l1, c1 }, 10) do order[#order + 1] = { r:get(), i } end
    assert.same({ { "c1", 2 }, { "l1", 1 } }, order)
    -- pending in both: each comes once, with its position
    local rs2 = { lp:submit(f, "l2"), pool:submit(f, "c2"), pool:map_async(f, { 1, 2 }),
                  lp:map_async(f, { 3 }) }
    local got = {}
    for r, i in mp.as_completed(rs2, 20) do got[i] = r:get(0) end
    assert.same({ "l2", "c2", { 1, 2, n = 2 }, { 3, n = 1 } }, got)
    -- one that never finishes (no worker serves "idle"): TimeoutError
    local never = idle:submit(f, 1)
    local it = mp.as_completed({ never, lp:submit(f, "l3") }, 0.5)
    local r = it()
    assert.equal("l3", r:get(0))
    local ok, e = pcall(it)
    assert.is_false(ok); assert.is_true(mp.TimeoutError:is(e))
    assert.is_true(never:cancel())
    pool:close(); pool:join(); idle:close(); idle:join()
  end)

  it("speaks the polling protocol: cqueues.poll and mp.wait on its AsyncResults", function()
    local pool <close> = cluster.Pool{ redis = rs.url, queue = "q", authkey = "k" }
    local r = pool:submit(function(x) return x + 1 end, 41)
    assert.equal(pool:fileno(), r:fileno())
    assert.equal(r:fileno(), r:pollfd()); assert.equal(pool:fileno(), pool:pollfd())
    assert.equal("r", r:events()); assert.equal("r", pool:events())
    local polls = 0
    while not r:ready() and polls < 10 do
      -- its socket wakes the poll (a result, or the read that waits in
      -- Redis answering empty after a second): the poll never times out
      assert.equal(r, cqueues.poll(r, 5))
      polls = polls + 1
    end
    assert.equal(42, r:get(0))
    assert.equal(r, cqueues.poll(r, 10))      -- ready: timeout() is 0
    assert.equal(0, r:timeout())
    local w = pool:submit(function() return "w" end)
    local ready = mp.wait({ w }, 10)
    polls = 0
    while #ready == 0 and polls < 100 do ready = mp.wait({ w }, 10); polls = polls + 1 end
    assert.same({ w }, ready)
    assert.equal("w", w:get(0))
    -- as luv uses it: the descriptor asked once, pool:poll() each time it
    -- is readable (each step leaves a read waiting in Redis, so the
    -- descriptor wakes again: first the waiting read's empty answer, then
    -- the result)
    local flag = helpers.tmpname("go")
    local fd = pool:fileno()
    local b = pool:submit(wait_for, flag)
    local done, wakes = false, 0
    b:add_done_callback(function() done = true end)
    while not done and wakes < 10 do
      assert.equal(1, #core.poll({ fd }, 5))
      pool:poll(0)
      wakes = wakes + 1
      if wakes == 1 then local f = assert(io.open(flag, "w")); f:close() end
    end
    assert.is_true(done); assert.is_true(wakes >= 2)
    assert.equal("went", b:get(0))
    os.remove(flag)
    -- several coroutines of one loop, each waiting for its own result
    local loop = cqueues.new()
    local got = {}
    for i = 1, 4 do
      loop:wrap(function()
        local x = pool:submit(function(n) return n * 10 end, i)
        while not x:ready() do cqueues.poll(x) end
        got[i] = x:get(0)
      end)
    end
    assert(loop:loop(20))
    assert.is_true(loop:empty(), "the loop did not finish")
    assert.same({ 10, 20, 30, 40 }, got)
    pool:close(); pool:join()
    assert.has_error(function() pool:fileno() end)
  end)
end)

-- One row of docs/cluster.md's failure table per spec below.
describe("cluster failures", function()
  local rs
  before_each(function() rs = start_redis() end)
  after_each(function() stop_machines(); rs.stop(); remove_keyfiles() end)

  local function exists(path)
    local f = io.open(path)
    if f then f:close() end
    return f ~= nil
  end

  it("a machine killed mid-task: another takes the task after its lease", function()
    local m1 = one_worker(rs)
    local pool <close> = cluster.Pool{ redis = rs.url, queue = "q", authkey = "k", lease = 1 }
    local flag = helpers.tmpname("started")
    finally(function() os.remove(flag) end)
    local r = pool:apply_async(function(path)
      local f = io.open(path, "a"); f:write("x"); f:close()
      local t = os.time() + 1 while os.time() <= t do end  -- busy a second or two
      return "done"
    end, { flag })
    assert(helpers.wait_until(function() return exists(flag) end, 15))
    m1.kill()                                 -- the whole machine, at once
    local m2 = machine(rs, "m2", { processes = 1 })
    assert.equal("done", r:get(30))
    local f = io.open(flag); local runs = #f:read("a"); f:close()
    assert.equal(2, runs)                     -- ran again, reached the client once
    assert.equal(1, pool:stats().done)
    pool:close(); pool:join()
    m2.stop(); m1.stop()
  end)

  it("a machine killed holding several tasks: all are taken over, each once", function()
    local m1 = machine(rs, "m1", { processes = 3 })
    assert(wait_workers(rs, 3))
    local pool <close> = cluster.Pool{ redis = rs.url, queue = "q", authkey = "k", lease = 1 }
    local flags, rs_ = {}, {}
    finally(function() for i = 1, 3 do if flags[i] then os.remove(flags[i]) end end end)
    for i = 1, 3 do
      flags[i] = helpers.tmpname("started" .. i)
      rs_[i] = pool:apply_async(function(path, v)
        local f = io.open(path, "a"); f:write("x"); f:close()
        local t = os.time() + 1 while os.time() <= t do end
        return v
      end, { flags[i], i * 10 })
    end
    assert(helpers.wait_until(function()
      for i = 1, 3 do if not exists(flags[i]) then return false end end
      return true
    end, 15))
    m1.kill()
    local m2 = machine(rs, "m2", { processes = 3 })
    for i = 1, 3 do
      assert.equal(i * 10, rs_[i]:get(30))
      local f = io.open(flags[i]); assert.equal(2, #f:read("a")); f:close()
    end
    assert.equal(3, pool:stats().done)
    pool:close(); pool:join()
    m2.stop(); m1.stop()
  end)

  it("a result that holds a handle fails its task with SerializationError naming where", function()
    local m1 = one_worker(rs)
    local pool <close> = cluster.Pool{ redis = rs.url, queue = "q", authkey = "k" }
    local ok, e = pcall(pool.apply, pool, function() return "x", mp.Queue() end)
    assert.is_false(ok)
    assert.is_true(mp.SerializationError:is(e))
    assert.truthy(e.message:find("result.r[2]: cannot serialize Queue handle here", 1, true), e.message)
    assert.equal(5, pool:apply(function() return 5 end))   -- the machine still serves
    pool:close(); pool:join()
    m1.stop()
  end)

  it("a task that kills its worker each time fails with WorkerLostError after max_retries", function()
    local m1 = one_worker(rs)
    local pool <close> = cluster.Pool{ redis = rs.url, queue = "q", authkey = "k", lease = 1, max_retries = 1 }
    local ok, e = pcall(pool.apply, pool, function() os.exit(3) end)
    assert.is_false(ok)
    assert.is_true(mp.WorkerLostError:is(e))
    assert.matches("lost 2 times", e.message)
    assert.matches("m1/%d+", e.worker)
    assert.equal(4, pool:apply(function() return 4 end))   -- the machine still serves
    pool:close(); pool:join()
    m1.stop()
  end)

  it("a client with the wrong key fails fast with AuthenticationError", function()
    local m1 = one_worker(rs)
    local ok, e = pcall(cluster.Pool, { redis = rs.url, queue = "q", authkey = "wrong" })
    assert.is_false(ok); assert.is_true(mp.AuthenticationError:is(e))
    m1.stop()
  end)

  it("a worker with the wrong key fails fast with AuthenticationError", function()
    local pool <close> = cluster.Pool{ redis = rs.url, queue = "q", authkey = "k" }
    local bad = machine(rs, "bad", { processes = 1, authkey = "wrong" })
    assert(helpers.wait_until(function() return not bad.alive() end, 10))
    assert.matches("AuthenticationError", bad.output())
    bad.stop()
    pool:close(); pool:join()
  end)

  it("a worker refuses an unsigned or forged task before decoding it", function()
    local m1 = one_worker(rs)
    local pool <close> = cluster.Pool{ redis = rs.url, queue = "q", authkey = "k" }
    local marker = helpers.tmpname("pwned")
    local evil = mp.dumps({ c = pool._client, t = 999, mode = "apply", args = {}, lease = 1000,
      fn = function() local f = io.open(marker, "w") f:write("x") f:close() end })
    local c = rs.cli()
    c:command("XADD", "mp:{q}:tasks", "*", "c", pool._client, "t", 999, "l", 1000, "m", evil, "s", "bogus")
    c:command("XADD", "mp:{q}:tasks", "*", "c", pool._client, "t", 998, "l", 1000, "m", evil)
    -- a forged result to the client: dropped and counted
    c:command("XADD", pool._rkey, "*", "t", 1, "m", mp.dumps({ t = 1, r = { "x", n = 1 } }), "s", "bad")
    c:close()
    assert.equal("ok", pool:apply(function() return "ok" end))
    assert(helpers.wait_until(function() return m1.output():find("refused task.*refused task") end, 10))
    assert.is_nil(io.open(marker))
    assert.equal(1, pool:stats().refused)
    pool:close(); pool:join()
    m1.stop()
  end)

  it("a signed result that cannot be decoded fails its task; a refusal names its reason", function()
    local pool <close> = cluster.Pool{ redis = rs.url, queue = "q", authkey = "k" }
    local r1 = pool:apply_async(function() return 1 end)
    local r2 = pool:apply_async(function() return 2 end)
    local c = rs.cli()
    c:command("XADD", pool._rkey, "*", "t", 1, "m", "garbage", "s", wire.sign("k", "garbage"))
    c:command("XADD", pool._rkey, "*", "t", 2, "refused", "undecodable: bad tag")
    c:close()
    local ok, e = pcall(r1.get, r1, 15)
    assert.is_false(ok); assert.is_true(mp.SerializationError:is(e))
    assert.matches("task result could not be decoded", e.message)
    ok, e = pcall(r2.get, r2, 15)
    assert.is_false(ok); assert.is_true(mp.ProcessError:is(e))
    assert.is_false(mp.AuthenticationError:is(e))
    assert.matches("undecodable: bad tag", e.message)
    assert.equal(0, pool:stats().refused)
    pool:terminate()
  end)

  it("starmap refuses an item that is not a table of arguments, at the caller's line", function()
    local pool <close> = cluster.Pool{ redis = rs.url, queue = "q", authkey = "k" }
    local ok, err = pcall(function()
      pool:starmap_async(function(a, b) return a + b end, { { 1, 2 }, 3 })
    end)
    assert.is_false(ok)
    assert.matches("13%-cluster_spec%.lua:%d+: bad argument #2 to 'starmap_async' "
                   .. "%(item 2 is not a table of arguments%)", err)
    assert.equal(0, pool:stats().queued)
    pool:close(); pool:join()
  end)

  it("a refused XADD raises and leaves no task for join to wait on", function()
    local pool <close> = cluster.Pool{ redis = rs.url, queue = "q", authkey = "k" }
    local c = rs.cli()
    c:command("DEL", "mp:{q}:tasks"); c:command("SET", "mp:{q}:tasks", "not a stream")
    assert.error_matches(function() pool:apply_async(function() return 1 end) end, "WRONGTYPE")
    assert.error_matches(function() pool:map_async(function(x) return x end, { 1, 2, 3 }, 1) end,
                         "WRONGTYPE")
    assert.equal(0, pool:stats().queued)
    assert.equal(0, select(2, pool:progress()))
    c:command("DEL", "mp:{q}:tasks"); c:close()
    pool:close(); pool:join()
  end)

  it("a task sent with a key the workers do not share fails with AuthenticationError", function()
    local m1 = one_worker(rs)
    -- the key check expired: the client could not tell at start
    local c = rs.cli(); c:command("DEL", "mp:{q}:key"); c:close()
    local pool <close> = cluster.Pool{ redis = rs.url, queue = "q", authkey = "other" }
    local r = pool:apply_async(function() return 1 end)
    local ok, e = pcall(r.get, r, 15)
    assert.is_false(ok); assert.is_true(mp.AuthenticationError:is(e))
    pool:terminate()
    m1.stop()
  end)

  it("no live worker: stats and progress show it and get(timeout) returns", function()
    local pool <close> = cluster.Pool{ redis = rs.url, queue = "q", authkey = "k" }
    local r = pool:apply_async(function() return 1 end)
    assert.same({ nil, "timeout" }, { r:get(0.3) })
    local st = pool:stats()
    assert.equal(0, st.machines); assert.equal(0, st.workers); assert.equal(1, st.queued)
    local done, total, workers = pool:progress()
    assert.equal(0, done); assert.equal(1, total); assert.equal(0, workers)
    -- a machine comes: the task runs
    local m1 = machine(rs, "m1", { processes = 1 })
    assert.equal(1, r:get(20))
    pool:close(); pool:join()
    m1.stop()
  end)

  it("a finished map leaves no keys; the last worker out leaves none at all", function()
    local m1 = machine(rs, "m1", { processes = 2 })
    assert(wait_workers(rs, 2))
    local pool = cluster.Pool{ redis = rs.url, queue = "q", authkey = "k" }
    pool:map(function(x) return x end, { 1, 2, 3, 4, 5 }, 1)
    pool:close(); pool:join()
    local k = keys(rs)
    assert.equal(3, #k)                       -- the queue's own: heartbeat, key check, stream
    assert.equal("mp:{q}:hb", k[1]); assert.equal("mp:{q}:key", k[2]); assert.equal("mp:{q}:tasks", k[3])
    local c = rs.cli()
    local hb = c:command("HGETALL", "mp:{q}:hb")
    assert.equal(2, #hb)                      -- one worker: "m1/<pid>", "2 <expiry>"
    assert.matches("^m1/%d+$", hb[1]); assert.matches("^2 %d+$", hb[2])
    assert.equal(0, c:command("XLEN", "mp:{q}:tasks"))
    c:close()
    m1.stop()
    assert.same({ n = 0 }, keys(rs))
  end)

  it("a client that dies leaves its result stream to expire", function()
    local m1 = one_worker(rs)
    local p = helpers.start(function(url)
      local pool = cluster.Pool{ redis = url, queue = "q", authkey = "k", result_ttl = 1 }
      pool:apply_async(function() return 1 end)
      core.poll({}, 60)                         -- killed while it waits
    end, rs.url)
    assert(helpers.wait_until(function()
      for _, k in ipairs(keys(rs)) do if k:find(":r:") then return true end end
    end, 15), "no result stream")
    p:kill(); helpers.finish(p)
    assert(helpers.wait_until(function()
      for _, k in ipairs(keys(rs)) do if k:find(":r:") then return false end end
      return true
    end, 10), "the result stream did not expire")
    m1.stop()
  end)

  it("a Redis restart (append-only file) mid-map loses nothing", function()
    rs.stop()
    rs = start_redis(true)
    local m1 = machine(rs, "m1", { processes = 2 })
    assert(wait_workers(rs, 2))
    local pool <close> = cluster.Pool{ redis = rs.url, queue = "q", authkey = "k" }
    local xs = {}
    for i = 1, 40 do xs[i] = i end
    local r = pool:map_async(function(x)
      local t = require("multiprocessing.core").monotonic() + 0.05
      while require("multiprocessing.core").monotonic() < t do end
      return x * 2
    end, xs, 1)
    assert.is_nil((r:get(0.3)))
    rs.stop(true)                             -- keep its directory: the AOF
    rs = start_redis(true, rs.dir)
    local out = r:get(60)
    assert.equal(40, out.n)
    for i = 1, 40 do assert.equal(2 * i, out[i]) end
    pool:close(); pool:join()
    m1.stop()
  end)
end)
