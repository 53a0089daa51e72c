-- multiprocessing.cluster.worker: cluster.serve, the worker side of the
-- cluster pool (docs/cluster.md).
--
-- One loop per machine (or per serve call): a local mp.Pool runs the
-- tasks; the loop waits on two things at once, a blocking XREADGROUP on one
-- Redis connection and the pool's fd, and does the rest (results, XACK,
-- lease renewals, reclaims, heartbeats) on a second connection, pipelined.
-- It reads no more tasks than it has room for (2 per process), so a
-- machine never hoards tasks others could run.
--
-- Leases: every task this worker holds (running or waiting for a process)
-- is re-claimed with XCLAIM ... JUSTID, which resets its idle time, every
-- lease/3. A task whose idle time passed its lease was held by a worker
-- that died or lost Redis: XPENDING (with IDLE) names its last holder and
-- its delivery count, and XCLAIM with that min-idle takes it atomically
-- (one worker wins). XAUTOCLAIM would do the taking in one call, but its
-- reply gives neither the last holder nor the delivery count, and both are
-- needed to fail the task with a WorkerLostError naming the holder once it
-- was delivered 1 + max_retries times.

local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local errors = require "multiprocessing.errors"
local conn = require "multiprocessing.cluster.conn"
local wire = require "multiprocessing.cluster.wire"
local check = require "multiprocessing.check"

local type, tostring, tonumber, pairs, ipairs, error, pcall =
      type, tostring, tonumber, pairs, ipairs, error, pcall
local pack, unpack = table.pack, table.unpack
local monotonic = core.monotonic
local math_min, math_max = math.min, math.max

local M = {}

-- The last worker out of an idle queue removes its stream (and group) and
-- its key check: nothing stays in Redis once a queue is not served. Atomic
-- (a script), so that a task added meanwhile is not lost; a later XADD
-- makes the stream again and a worker's NOGROUP makes the group again.
local LAST_OUT = [[
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('XLEN', KEYS[1]) ~= 0 then return 0 end
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  for i = 1, #g, 2 do
    if (g[i] == 'consumers' or g[i] == 'pending') and g[i + 1] ~= 0 then return 0 end
  end
end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
]]

-- A consumer leaving: deleted only when nothing is pending for it, since
-- Redis drops a deleted consumer's pending entries from the group and no
-- one could claim them again.
local LEAVE = [[
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
]]

local function hostname()
  local f = io.open("/proc/sys/kernel/hostname")
  local h = f and f:read("l")
  if f then f:close() end
  return h or "localhost"
end

local OPTIONS = { redis = "string", queue = "string", authkey = "string",
  processes = true, machine = "string", heartbeat = true, stop = "callable",
  ready = "callable", initializer = true, initargs = true, maxtasksperchild = true,
  verbose = true }

-- cluster.serve{redis=, queue=, authkey=, processes=, machine=, heartbeat=,
-- stop=fn, ready=fn, ...}: serve the queue until stop() returns true (or
-- forever); returns the number of tasks done. Options are checked as
-- cluster.Pool's are (check.lua); the local Pool checks the ones it takes.
function M.serve(o)
  if type(o) ~= "table" then
    check.argerror(1, "serve", "options table expected, got " .. check.typename(o), 2)
  end
  check.options(o, 1, "serve", OPTIONS, 2)
  for _, k in ipairs{ "redis", "queue", "authkey" } do
    if o[k] == nil then check.argerror(1, "serve", "'" .. k .. "' is required", 2) end
  end
  local url, queue, authkey = o.redis, o.queue, o.authkey
  local nproc = check.integer(o.processes, 1, "serve", "'processes'", 1, nil, 2) or mp.cpu_count()
  local machine = o.machine or hostname()
  local hb_every = check.positive(o.heartbeat, 1, "serve", "'heartbeat'", 2) or 1
  local stop = o.stop or function() return false end
  local verbose = o.verbose
  local keys = wire.keys(queue)
  local me = machine .. "/" .. core.getpid()
  local wc = conn.new(url)                -- commands
  local rc = conn.new(url)                -- the blocking read
  wire.check_key(wc, keys, authkey, 2)
  local r, e = wc:call("XGROUP", "CREATE", keys.tasks, wire.GROUP, "0", "MKSTREAM")
  if not r and not tostring(e):find("BUSYGROUP") then error("XGROUP CREATE: " .. tostring(e), 2) end

  local pool = mp.Pool{ processes = nproc, initializer = o.initializer, initargs = o.initargs,
                        maxtasksperchild = o.maxtasksperchild }
  local room = 2 * nproc
  local held, nheld = {}, 0               -- entry id -> {lease=ms, renew_at=}
  local out = {}                          -- commands to send, pipelined
  local done = 0
  local function log(...)
    if verbose then io.stderr:write(me, ": ", table.concat({...}, " "), "\n") end
  end

  local function release(id)
    if held[id] then held[id] = nil; nheld = nheld - 1 end
    out[#out + 1] = { "XACK", keys.tasks, wire.GROUP, id }
    out[#out + 1] = { "XDEL", keys.tasks, id }
  end

  local function publish(id, client, t, ttl, msg)
    -- Redis carries no fds: a result that holds a handle fails its task
    -- with the SerializationError naming where the handle sits
    local okm, m = pcall(core.pool_dumps, msg, "result")
    if not okm then
      local why = errors.is_error(m) and m or errors.new("SerializationError", tostring(m))
      m = core.pool_dumps({ t = msg.t, err = errors.to_data(why) }, "result")
    end
    local rkey = keys.result(client)
    out[#out + 1] = { "XADD", rkey, "*", "t", t, "m", m, "s", wire.sign(authkey, m) }
    out[#out + 1] = { "PEXPIRE", rkey, ttl }
    release(id)
    done = done + 1
  end

  local function refuse(id, f, why)
    log("refused task", id, why)
    if f.c and f.t then
      local rkey = keys.result(f.c)
      out[#out + 1] = { "XADD", rkey, "*", "t", f.t, "refused", why }
      out[#out + 1] = { "PEXPIRE", rkey, 60000 }
    end
    release(id)
  end

  -- a task entry read or claimed: check, decode, hand to the pool
  local function take(id, list, deliveries, last)
    local f = wire.fields(list)
    local task, why = wire.decode(authkey, f.m, f.s)
    if not task then return refuse(id, f, why) end
    if type(task) ~= "table" or task.c ~= f.c or tostring(task.t) ~= f.t then
      return refuse(id, f, "fields do not match the signed message")
    end
    local ttl = task.ttl or 60000
    if not held[id] then nheld = nheld + 1 end
    held[id] = { lease = task.lease, renew_at = monotonic() + task.lease / 3000 }
    if deliveries and deliveries > 1 + (task.max_retries or 2) then
      local d = errors.to_data(errors.new("WorkerLostError",
        ("task lost %d times; its last worker was %s"):format(deliveries - 1, last)))
      d.worker = last
      return publish(id, task.c, f.t, ttl, { t = task.t, err = d })
    end
    local function ok(...) publish(id, task.c, f.t, ttl, { t = task.t, r = pack(...) }) end
    local function fail(err)
      if errors.WorkerLostError:is(err) and held[id] then
        -- the process running it died: not a result but a lost delivery;
        -- stop renewing, and the task is taken again once its lease ends
        -- (here or elsewhere), up to max_retries times
        log("lost task", id, tostring(err.message))
        held[id] = nil; nheld = nheld - 1
        return
      end
      publish(id, task.c, f.t, ttl, { t = task.t, err = errors.to_data(err) })
    end
    local good, err = pcall(function()
      if task.mode == "apply" then
        pool:apply_async(task.fn, task.args, { callback = ok, error_callback = fail, timeout = task.timeout })
      else
        -- each item's results, all of them (imap gives them all), packed
        local fn = task.fn
        local each = task.star and function(a) return pack(fn(unpack(a, 1, a.n or #a))) end
                     or function(x) return pack(fn(x)) end
        pool:map_async(each, task.args, { callback = function(rs)
          publish(id, task.c, f.t, ttl, { t = task.t, r = rs })
        end, error_callback = fail })
      end
    end)
    if not good then fail(err) end
  end

  local function flush()
    if #out == 0 then return end
    local cmds = out
    out = {}
    local replies = wc:pipeline(cmds)
    for i, rep in ipairs(replies) do
      if rep[1] == nil and rep[2] then log(cmds[i][1], "failed:", tostring(rep[2])) end
    end
  end

  local function renew(now)
    local ids = {}
    for id, h in pairs(held) do
      if now >= h.renew_at then ids[#ids + 1] = id; h.renew_at = now + h.lease / 3000 end
    end
    if #ids > 0 then
      -- JUSTID: the renewal neither reads the entries nor counts a delivery
      ids[#ids + 1] = "JUSTID"
      wc:call("XCLAIM", keys.tasks, wire.GROUP, me, 0, unpack(ids, 1, #ids))
    end
  end

  -- take over tasks whose lease ran out (their holder died): the
  -- candidates' leases are read in one pipeline, and those past it
  -- claimed in another (XCLAIM's min-idle makes one worker win each)
  local function reclaim()
    if nheld >= room then return end
    local pend = wc:call("XPENDING", keys.tasks, wire.GROUP, "IDLE", 1000, "-", "+", room - nheld)
    if type(pend) ~= "table" then return end
    local cand, reads = {}, {}
    for _, p in ipairs(pend) do
      if not held[p[1]] then
        cand[#cand + 1] = p
        reads[#reads + 1] = { "XRANGE", keys.tasks, p[1], p[1] }
      end
    end
    if #cand == 0 then return end
    local ents, past, claims = wc:pipeline(reads), {}, {}
    for i, p in ipairs(cand) do
      local ent = ents[i][1]
      local f = type(ent) == "table" and ent[1] and wire.fields(ent[1][2]) or {}
      local lease = tonumber(f.l) or 10000
      if p[3] >= lease then
        past[#past + 1] = p
        claims[#claims + 1] = { "XCLAIM", keys.tasks, wire.GROUP, me, lease, p[1] }
      end
    end
    if #claims == 0 then return end
    for i, rep in ipairs(wc:pipeline(claims)) do
      local got, p = rep[1], past[i]
      if type(got) == "table" and got[1] then
        log("took over", p[1], "from", p[2], "delivery", p[4] + 1)
        take(p[1], got[1][2], p[4] + 1, p[2])
      end
    end
  end

  local function heartbeat()
    wc:pipeline{ { "EVAL", wire.HEARTBEAT, 1, keys.hb, me, tostring(nproc),
                   tostring(math.floor(hb_every * 3000)) },
                 { "EXPIRE", keys.key, wire.KEY_TTL } }
  end

  local reading = false
  local next_hb, next_claim = 0, monotonic() + 0.5
  local ok, err = pcall(function()
    if o.ready then heartbeat(); next_hb = monotonic() + hb_every; o.ready() end
    while not stop() do
      local now = monotonic()
      if now >= next_hb then heartbeat(); next_hb = now + hb_every end
      renew(now)
      if now >= next_claim then reclaim(); next_claim = now + 1 end
      flush()
      if not reading and nheld < room then
        rc:send("XREADGROUP", "GROUP", wire.GROUP, me, "COUNT", room - nheld, "BLOCK", 1000,
                "STREAMS", keys.tasks, ">")
        reading = true
      end
      local wait = math_max(0, math_min(next_hb, next_claim) - monotonic())
      local fds = { pool:fileno() }
      if reading then fds[2] = rc:fileno() end
      core.poll(fds, math_min(wait, 0.25))
      pool:poll(0)
      if reading then
        local rep, why = rc:poll(0)
        if rep ~= nil or why ~= "timeout" then
          reading = false
          if type(rep) == "table" then
            for _, entry in ipairs(rep[1][2]) do take(entry[1], entry[2]) end
          elseif why == "reset" or (why and why:find("NOGROUP")) then
            wc:call("XGROUP", "CREATE", keys.tasks, wire.GROUP, "0", "MKSTREAM")
          end
        end
      end
      flush()
    end
  end)
  -- (a callback that raises in terminate must not skip the cleanup below)
  local tok, terr = pcall(pool.terminate, pool)
  if ok and not tok then ok, err = false, terr end
  -- the read in flight ends with its connection (what it was given stays
  -- pending for this consumer); the results and acks not sent yet go first
  rc:close()
  if wc.c and not wc.c:closed() then
    pcall(flush)
    -- a consumer's pending entries go with it: LEAVE deletes it only when
    -- none is left (the others are taken over when their leases end)
    pcall(wc.pipeline, wc, { { "HDEL", keys.hb, me },
                             { "EVAL", LEAVE, 1, keys.tasks, wire.GROUP, me },
                             { "EVAL", LAST_OUT, 2, keys.tasks, keys.key } })
  end
  wc:close(); rc:close()
  if not ok then error(err, 0) end
  return done
end

return M
