-- multiprocessing.cluster.wire: what the client and the workers of a
-- cluster pool agree on: key names, signed messages, the key check and
-- the heartbeats (docs/cluster.md).
--
-- Keys of queue Q (one hash tag, {Q}, so that a Redis Cluster keeps a
-- queue on one node):
--   mp:{Q}:tasks        stream of tasks, consumer group "workers"
--   mp:{Q}:r:<client>   one client's result stream (expires if it dies)
--   mp:{Q}:hb           the workers' heartbeats: a hash, see HEARTBEAT
--   mp:{Q}:key          the key check: HMAC(authkey, KEYCHECK), with expiry
-- A task entry has fields c (client), t (task number), l (lease, ms),
-- m (the message: mp.dumps of the task) and s (HMAC-SHA256 of m); a result
-- entry has t, m and s, or t and "refused" (a worker could not verify the
-- task's signature: unsigned, since that worker's key is not the client's).

local mp = require "multiprocessing"
local auth = require "multiprocessing.auth"
local errors = require "multiprocessing.errors"

local M = {}

M.GROUP = "workers"
local KEYCHECK = "multiprocessing.cluster key check v1"
M.KEY_TTL = 60                 -- seconds the key check outlives its users

function M.keys(queue)
  local p = "mp:{" .. queue .. "}:"
  return { prefix = p, tasks = p .. "tasks", key = p .. "key", hb = p .. "hb",
           result = function(client) return p .. "r:" .. client end }
end

function M.sign(authkey, m) return auth.hmac_sha256(authkey, m) end

-- wire.verify(authkey, m, s) -> boolean (constant time)
function M.verify(authkey, m, s)
  if type(m) ~= "string" or type(s) ~= "string" then return false end
  return auth.equal_digest(auth.hmac_sha256(authkey, m), s)
end

-- wire.decode(authkey, m, s) -> value | nil, why: the signature is checked
-- before a single byte is decoded; only then are functions loaded
function M.decode(authkey, m, s)
  if not M.verify(authkey, m, s) then return nil, "bad signature" end
  local ok, v = pcall(mp.loads, m, { functions = true })
  if not ok then return nil, "undecodable: " .. tostring(v) end
  return v
end

-- Fields of a stream entry (a flat list) as a table.
function M.fields(list)
  local t = {}
  for i = 1, #list - 1, 2 do t[list[i]] = list[i + 1] end
  return t
end

function M.hex(s)
  return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

-- wire.check_key(conn, keys, authkey, level): the first client or worker
-- of a queue stores the key check; one whose key gives another value
-- raises AuthenticationError at once (it is the side with the wrong key).
function M.check_key(conn, keys, authkey, level)
  local mine = M.hex(auth.hmac_sha256(authkey, KEYCHECK))
  local ok = conn:call("SET", keys.key, mine, "NX", "EX", M.KEY_TTL)
  if ok then return mine end
  local theirs = conn:call("GET", keys.key)
  if theirs and theirs ~= mine then
    error(errors.new("AuthenticationError",
      "authkey differs from the one the queue's other clients and workers use"), level + 1)
  end
  conn:call("EXPIRE", keys.key, M.KEY_TTL)
  return mine
end

-- Heartbeats: one hash per queue, field "<machine>/<pid>", value
-- "<processes> <expiry>", the expiry in Redis's own clock (TIME, in
-- milliseconds), so that machines whose clocks differ agree. A worker
-- refreshes its field (HEARTBEAT: its id, processes, time to live in ms);
-- ALIVE drops the expired fields and returns the others as id, processes
-- pairs. The hash expires with its last live field. O(workers), whatever
-- else the Redis holds.
local NOW = [[
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
]]
M.HEARTBEAT = NOW .. [[
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. (now + ttl))
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
]]
local ALIVE = NOW .. [[
local v, out = redis.call('HGETALL', KEYS[1]), {}
for i = 1, #v, 2 do
  local n, exp = string.match(v[i + 1], '^(%d+) (%d+)$')
  if n and tonumber(exp) > now then
    out[#out + 1] = v[i]; out[#out + 1] = n
  else
    redis.call('HDEL', KEYS[1], v[i])
  end
end
return out
]]

-- wire.alive(conn, keys) -> machines, workers: heartbeats not expired
function M.alive(conn, keys)
  local r = conn:call("EVAL", ALIVE, 1, keys.hb)
  local machines, workers, seen = 0, 0, {}
  for i = 1, type(r) == "table" and #r or 0, 2 do
    local n = tonumber(r[i + 1])
    if n then
      workers = workers + n
      local machine = r[i]:match("^(.*)/%d+$") or r[i]
      if not seen[machine] then seen[machine] = true; machines = machines + 1 end
    end
  end
  return machines, workers
end

return M
