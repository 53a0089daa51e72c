-- Chaos family "queues" (chaos/run.lua): producers and consumers of a
-- Queue, JoinableQueue or SimpleQueue (in turn) SIGKILLed at random
-- moments; every item is accounted for.
--
-- Accounting, exact by construction but for one window that is counted
-- apart:
--  * producer p puts items p*K+1 .. p*K+K in order and, after each put
--    returns, stores in done[p] how many have returned. Items up to done[p]
--    must come out once. The next one, done[p]+1 of a killed producer, may
--    or may not have gone in (it was killed inside put, or after put
--    returned but before the store): it must come out at most once. Later
--    ones were never put: they must not come out at all.
--  * each consumer incarnation has its own slot; after get returns item v
--    it adds one to rec[slot][v] (only that process writes there). Its
--    state[slot] is 1 from just before get until the item is recorded.
--  * at the end the trial drains the queue and counts what is left.
-- An item that must come out but nobody has is "lost", except that a
-- consumer killed with state 1 may have taken one item with it: the queue
-- may have handed it over (a get is done once the ring's state is
-- committed, inside get) or the consumer died before recording it. Those
-- items, at most one per such consumer, are counted as "inflight", not
-- lost. An item seen more often than it was put is "duplicated".
local mp = require "multiprocessing"
local lib = require "chaos.lib"

local P, K, C = 3, 300, 3          -- producers, items each, consumers
local SLOTS = C + 8                -- consumer incarnations at most
local KINDS = { "Queue", "JoinableQueue", "SimpleQueue" }
local STOP = -1

-- Bursts of puts with short pauses, so that kills land anywhere in a
-- stream that lasts about 0.3 s.
local function producer(q, done, p)
  math.randomseed(p, mp.current_process().pid)
  local i = 0
  while i < K do
    for _ = 1, math.random(1, 12) do
      if i == K then break end
      i = i + 1
      q:put(p * K + i)
      done[p] = i
    end
    lib.sleep(0.002)
  end
end

local function consumer(q, rec, state, slot, kind)
  local off = (slot - 1) * P * K
  local simple, joinable = kind == "SimpleQueue", kind == "JoinableQueue"
  while true do
    state[slot] = 1
    local v
    if simple then v = q:get() else v = q:get(0.05) end
    if v == STOP then
      state[slot] = 0
      if joinable then q:task_done() end
      return
    end
    if v then
      local i = v - K               -- items are K+1 .. K+P*K
      rec[off + i] = rec[off + i] + 1
      if joinable then q:task_done() end
    end
    state[slot] = 0
  end
end

local function trial(_, k)
  local r = { lost = 0, dup = 0, hangs = 0, crashes = 0, inflight = 0 }
  local kind = KINDS[(k - 1) % #KINDS + 1]
  local maxsize = kind ~= "SimpleQueue" and ({ 0, 0, 5, 50 })[math.random(4)] or nil
  local q = kind == "SimpleQueue" and mp.SimpleQueue() or mp[kind](maxsize)
  local N = P * K
  local done = mp.RawArray("int64", P)
  local rec = mp.RawArray("int32", SLOTS * N)
  local state = mp.RawArray("int32", SLOTS)

  local prods, cons, killed_prod = {}, {}, {}
  for p = 1, P do
    prods[p] = mp.Process{ target = producer, args = { q, done, p } }
    prods[p]:start()
  end
  local nslots = 0
  local function new_consumer()
    nslots = nslots + 1
    local c = mp.Process{ target = consumer, args = { q, rec, state, nslots, kind } }
    c:start()
    cons[#cons + 1] = { proc = c, slot = nslots }
  end
  for _ = 1, C do new_consumer() end

  -- kills at random moments of the first 0.4 s
  local times = {}
  for i = 1, math.random(2, 6) do times[i] = math.random() * 0.4 end
  table.sort(times)
  local t0 = lib.now()
  for _, at in ipairs(times) do
    lib.sleep(t0 + at - lib.now())
    local live = {}
    for p = 1, P do if not killed_prod[p] and prods[p]:is_alive() then live[#live + 1] = p end end
    if math.random() < 0.5 and #live > 0 then
      local p = live[math.random(#live)]
      prods[p]:kill()
      prods[p]:join(5)
      killed_prod[p] = true
    elseif nslots < SLOTS then
      local i = math.random(#cons)
      local c = table.remove(cons, i)
      c.proc:kill()
      if c.proc:join(5) == nil then r.hangs = r.hangs + 1 end
      if state[c.slot] ~= 0 then r.inflight = r.inflight + 1 end   -- an allowance for now
      c.proc:close()
      new_consumer()
    end
  end

  -- the producers left finish; then one STOP per consumer
  for p = 1, P do
    if not killed_prod[p] and prods[p]:join(30) == nil then
      r.hangs = r.hangs + 1
      prods[p]:kill(); prods[p]:join(5)
    end
    prods[p]:close()
  end
  for _ = 1, #cons do
    if kind == "SimpleQueue" then q:put(STOP)
    elseif not q:put(STOP, 10) then r.hangs = r.hangs + 1 end
  end
  for _, c in ipairs(cons) do
    if c.proc:join(20) == nil then
      r.hangs = r.hangs + 1
      c.proc:kill(); c.proc:join(5)
    end
    c.proc:close()
  end

  -- drain what is left
  local left = {}
  while true do
    local v
    if kind == "SimpleQueue" then
      if q:empty() then break end
      v = q:get()
    else
      local why
      v, why = q:get(0.2)
      if v == nil then
        if why ~= "timeout" or q:qsize() > 0 then r.hangs = r.hangs + 1 end
        break
      end
    end
    if v ~= STOP then left[v - K] = (left[v - K] or 0) + 1 end
  end

  -- count
  local missing = 0
  for p = 1, P do
    local d = done[p]
    for i = 1, K do
      local id = (p - 1) * K + i
      local n = left[id] or 0
      for s = 0, nslots - 1 do n = n + rec[s * N + id] end
      local may = (i <= d and 1) or ((i == d + 1 and killed_prod[p]) and 1) or 0
      if i <= d and n == 0 then missing = missing + 1 end
      if n > may then r.dup = r.dup + n - may end
    end
  end
  if missing > r.inflight then r.lost = missing - r.inflight else r.inflight = missing end

  q:close(); done:close(); rec:close(); state:close()
  return r
end

if mp.is_main() then lib.batch(trial, 120) end
