-- Handles inside Queue items (csrc/queue_chan.c): an item holding an
-- Event, a Lock, a Pipe end, a Queue or a Value reaches whichever consumer
-- takes it, under every start method, through Queue, SimpleQueue and
-- JoinableQueue, the feeder and a producer's exit; producers and
-- consumers killed mid-transfer and forged datagrams lose at most their
-- own item and leak no descriptor.
local H = require "helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local METHODS = { "fork", "spawn", "forkserver" }

local start = H.start_by   -- start(m, fn, ...): a child of start method m

-- Run body(); stop the fork server afterwards (leakcheck counts it).
local function with(m, body)
  local ok, err = pcall(body)
  if m == "forkserver" then require("multiprocessing.spawn")._forkserver_stop() end
  if not ok then error(err, 0) end
end

-- Read one message from each of the read ends rs until n have come (10 s
-- at most); returns them as a list of {index of the end, message}.
local function collect(rs, n)
  local got, deadline = {}, core.monotonic() + 10
  while #got < n and core.monotonic() < deadline do
    for _, c in ipairs(mp.wait(rs, 0.5)) do
      for i, r in ipairs(rs) do
        if r == c then got[#got + 1] = { i, r:recv(1) } end
      end
    end
  end
  return got
end

for _, m in ipairs(METHODS) do
  describe("handles in Queue items under " .. m, function()
    H.leakcheck()

    it("an item holding an Event, a Lock, a Pipe end, a Queue and a Value is " ..
       "used by the consumer", function()
      with(m, function()
        local q <close> = mp.Queue()
        local back <close> = mp.Queue()
        local ev, lock, val = mp.Event(), mp.Lock(), mp.Value("i", 0)
        local r, w = mp.Pipe(false)
        assert.is_true(lock:acquire())
        assert.is_true(q:put({ ev = ev, lock = lock, w = w, back = back, val = val, n = 7 }))
        local p = start(m, function(qq)
          local it = qq:get(10)
          local free = it.lock:acquire(0)          -- the parent holds it
          it.val.value = it.n * 6
          it.w:send("from the consumer")
          it.back:put({ free = free })
          it.ev:set()
        end, q)
        assert.is_true(ev:wait(10))
        assert.are.equal("from the consumer", r:recv(10))
        assert.are.same({ free = false }, back:get(10))
        assert.are.equal(42, val.value)
        assert.are.equal(0, H.finish(p, 10))
        lock:release()
        for _, o in ipairs{ ev, lock, val, r, w } do o:close() end
      end)
    end)

    it("several producers and consumers: every item arrives once, with its own " ..
       "handles", function()
      with(m, function()
        local NP, NC, N, K = 2, 2, 40, 4
        local q <close> = mp.Queue()
        local plain <close> = mp.Queue()
        local rs, ws = {}, {}
        for k = 1, K do rs[k], ws[k] = mp.Pipe(false) end
        local procs = {}
        for _ = 1, NC do
          procs[#procs + 1] = start(m, function(qq, pq)
            while true do
              local it = qq:get(20)
              if it == "stop" then return 0 end
              if type(it) == "table" then it.w:send(it.i) else pq:put(it) end
            end
          end, q, plain)
        end
        for pr = 1, NP do
          procs[#procs + 1] = start(m, function(qq, base, n, k, ...)
            local wsx = { ... }
            for i = base + 1, base + n do
              if i % 2 == 0 then qq:put({ i = i, w = wsx[i % k + 1] })
              else qq:put(i) end
            end
          end, q, pr * 1000, N, K, table.unpack(ws))
        end
        local seen = {}
        for _, g in ipairs(collect(rs, NP * N // 2)) do
          local k, i = g[1], g[2]
          assert.are.equal(i % K + 1, k)             -- the item's own pipe end
          assert.is_nil(seen[i])
          seen[i] = true
        end
        for _ = 1, NP * N // 2 do
          local i = plain:get(10)
          assert.is_nil(seen[i])
          seen[i] = true
        end
        for pr = 1, NP do
          for i = pr * 1000 + 1, pr * 1000 + N do assert.is_true(seen[i], i) end
        end
        for _ = 1, NC do q:put("stop") end
        for _, p in ipairs(procs) do assert.are.equal(0, H.finish(p, 20)) end
        for k = 1, K do rs[k]:close(); ws[k]:close() end
      end)
    end)

    it("SimpleQueue and JoinableQueue carry handles; task_done and join count them", function()
      with(m, function()
        local sq <close> = mp.SimpleQueue()
        local jq <close> = mp.JoinableQueue()
        local ev = mp.Event()
        local r, w = mp.Pipe(false)
        sq:put({ ev = ev })
        for i = 1, 5 do jq:put({ i, w }) end
        local p = start(m, function(s, j)
          s:get(10).ev:set()
          for _ = 1, 5 do
            local it = j:get(10)
            it[2]:send(it[1])
            j:task_done()
          end
        end, sq, jq)
        assert.is_true(ev:wait(10))
        assert.is_true(jq:join(10))
        local sum = 0
        for _ = 1, 5 do sum = sum + r:recv(10) end
        assert.are.equal(15, sum)
        assert.are.equal(0, H.finish(p, 10))
        ev:close(); r:close(); w:close()
      end)
    end)

    it("items behind the feeder and put just before the producer exits arrive", function()
      with(m, function()
        local q <close> = mp.Queue()
        local r, w = mp.Pipe(false)
        local p = start(m, function(qq, ww)
          qq:put(string.rep("b", 5 << 20))      -- beyond 4 MiB: the rest waits in the feeder
          for i = 1, 10 do assert(qq:put_nowait({ i = i, w = ww })) end
          ww:close()                            -- the feeder holds its own copies
        end, q, w)
        assert.are.equal(0, H.finish(p, 20))    -- exited: its feeder was flushed
        assert.are.equal(5 << 20, #q:get(10))
        for i = 1, 10 do
          local it = q:get(10)
          assert.are.equal(i, it.i)
          it.w:send(i)
          it.w:close()
          assert.are.equal(i, r:recv(5))
        end
        assert.is_true(q:empty())
        r:close(); w:close()
      end)
    end)
  end)
end

describe("handles in Queue items", function()
  H.leakcheck()

  -- A datagram's bytes: magic "MPFD", nfds, id (csrc/queue_chan.c).
  local function dgram(nfds, id) return string.pack("<I4I4I8", 0x4d504644, nfds, id) end

  it("a full descriptor channel: put_nowait says full, put times out, an " ..
     "unbounded put leaves the item to the feeder", function()
    local bq <close> = mp.Queue(100)
    local uq <close> = mp.Queue()
    local r, w = mp.Pipe(false)
    core._test.queue_chan_sndbuf(bq, 1)      -- the least the system allows
    core._test.queue_chan_sndbuf(uq, 1)
    local n = 0
    while n < 1000 and bq:put_nowait({ w }) do n = n + 1 end
    assert.is_true(n > 0 and n < 1000)
    assert.are.same({ nil, "full" }, { bq:put_nowait({ w }) })
    assert.are.same({ nil, "timeout" }, { bq:put({ w }, 0.05) })
    assert.is_true(bq:put(1, 0))              -- plain items do not use the channel
    assert.are.equal(n + 1, bq:qsize())
    for i = 1, n + 20 do assert.is_true(uq:put({ i, w })) end
    for i = 1, n + 20 do
      local it = uq:get(10)
      assert.are.equal(i, it[1])
      it[2]:send(i)
      assert.are.equal(i, r:recv(5))
      it[2]:close()
    end
    for _ = 1, n do bq:get(1)[1]:close() end
    assert.are.equal(1, bq:get(1))
    r:close(); w:close()
  end)

  it("a channel that orphans and forgeries filled is emptied when no item waits", function()
    local bq <close> = mp.Queue(10)
    local r, w = mp.Pipe(false)
    finally(function() r:close(); w:close() end)
    core._test.queue_chan_sndbuf(bq, 1)
    local n = 0                              -- datagrams no record will claim
    while n < 1000 and core._test.queue_chan_send(bq, dgram(1, 1 << 40), w:fileno()) do
      n = n + 1
    end
    assert.is_true(n > 0 and n < 1000, "sent " .. n)
    assert.is_true(bq:empty())
    assert.is_true(bq:put({ w = w }, 5))     -- would wait for ever for room
    local it = bq:get(5)
    it.w:send("through")
    assert.are.equal("through", r:recv(5))
    it.w:close()
  end)

  it("a JoinableQueue counts items with handles that wait in the feeder", function()
    local jq <close> = mp.JoinableQueue()
    local r, w = mp.Pipe(false)
    jq:put(string.rep("j", 5 << 20))          -- the next ones wait in the feeder
    for i = 1, 3 do assert.is_true(jq:put({ i = i, w = w })) end
    w:close()                                 -- the feeder holds its own copies
    assert.are.equal(4, jq:_stats().unfinished)
    assert.are.equal(5 << 20, #jq:get(10))
    jq:task_done()
    for i = 1, 3 do
      local it = jq:get(10)
      assert.are.equal(i, it.i)
      it.w:send(i)
      it.w:close()
      assert.are.equal(i, r:recv(5))
      jq:task_done()
    end
    assert.is_true(jq:join(5))
    r:close()
  end)

  it("a JoinableQueue whose producer exits with items its full channel never took: "
     .. "join() does not wait for them", function()
    local jq <close> = mp.JoinableQueue()
    local r, w = mp.Pipe(false)
    core._test.queue_chan_sndbuf(jq, 1)      -- a channel that fills at once
    local N = 500
    local p = H.start(function(q, ww)
      for i = 1, N do q:put({ i = i, w = ww }) end
      -- leaving: the feeder gives up on what the full channel cannot take
    end, jq, w)
    assert.are.equal(0, H.finish(p, 30))
    local got = 0
    while true do
      local it = jq:get(0)
      if it == nil then break end
      got = got + 1
      it.w:close()
      jq:task_done()
    end
    assert.is_true(got > 0 and got < N, "got " .. got)   -- some were dropped
    assert.are.equal(0, jq:_stats().unfinished)
    assert.is_true(jq:join(5))
    w:close(); r:close()
  end)

  it("a producer killed between its datagram and its record loses only its item", function()
    local q <close> = mp.Queue()
    local r1, w1 = mp.Pipe(false)
    local r2, w2 = mp.Pipe(false)
    local fds0 = H.fd_count()
    H.crash_at(3, function(qq, ww) qq:put({ w = ww, who = "dead" }) end, q, w1)
    assert.is_true(q:put({ w = w2, who = "next" }, 10))   -- takes the dead one's lock over
    local it = q:get(10)
    assert.are.equal("next", it.who)
    it.w:send("ok")
    assert.are.equal("ok", r2:recv(5))
    it.w:close()
    assert.is_true(q:empty())
    assert.are.equal(fds0, H.fd_count())
    r1:close(); w1:close(); r2:close(); w2:close()
  end)

  it("a consumer killed after taking a marked record: later items keep their fds", function()
    local q <close> = mp.Queue()
    local r1, w1 = mp.Pipe(false)
    local r2, w2 = mp.Pipe(false)
    local fds0 = H.fd_count()
    q:put({ w = w1, i = 1 })
    q:put("plain")
    q:put({ w = w2, i = 2 })
    H.crash_at(4, function(qq) qq:get(10) end, q)
    assert.are.equal("plain", q:get(10))
    local it = q:get(10)
    assert.are.equal(2, it.i)
    it.w:send("two")
    assert.are.equal("two", r2:recv(5))
    it.w:close()
    assert.is_true(q:empty())
    assert.are.equal(fds0, H.fd_count())
    r1:close(); w1:close(); r2:close(); w2:close()
  end)

  it("a JoinableQueue item whose descriptors were lost is not waited for by join()", function()
    local jq <close> = mp.JoinableQueue()
    local r, w = mp.Pipe(false)
    finally(function() r:close(); w:close() end)
    assert.is_true(core._test.queue_chan_send(jq, dgram(2, 1), w:fileno()))  -- id 1, one fd short
    assert.is_true(jq:put({ w = w }))                                         -- id 1
    local ok, err = pcall(jq.get, jq, 5)
    assert.is_false(ok)
    assert.is_true(mp.SerializationError:is(err), tostring(err))
    assert.are.equal(0, jq:_stats().unfinished)
    assert.is_true(jq:join(1))
  end)

  it("forged datagrams make at most their item fail, never a crash or a hang", function()
    local q <close> = mp.Queue()
    local r, w = mp.Pipe(false)
    local fds0 = H.fd_count()
    local send = core._test.queue_chan_send
    local wfd = w:fileno()
    assert.is_true(send(q, "garbage", wfd))                 -- bad size
    assert.is_true(send(q, string.rep("\0", 16), wfd))      -- bad magic
    assert.is_true(send(q, dgram(1, 1 << 40), wfd))         -- an id never given
    assert.is_true(send(q, dgram(2, 1), wfd))               -- item 1's id, one fd short
    assert.is_true(q:put({ w = w, i = 1 }))                  -- id 1
    assert.is_true(q:put({ w = w, i = 2 }))                  -- id 2
    assert.is_true(q:put("plain"))
    local ok, err = pcall(q.get, q, 5)                       -- the forgery took item 1's place
    assert.is_false(ok)
    assert.is_true(mp.SerializationError:is(err), tostring(err))
    assert.truthy(err.message:find("descriptors were lost", 1, true), err.message)
    local it = q:get(5)                                       -- item 2 is whole
    assert.are.equal(2, it.i)
    it.w:send("two")
    assert.are.equal("two", r:recv(5))
    it.w:close()
    assert.are.equal("plain", q:get(5))
    assert.is_true(q:empty())
    assert.are.equal(fds0, H.fd_count())           -- the forged datagrams' fds were closed
    r:close(); w:close()
  end)
end)
