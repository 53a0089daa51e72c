-- multiprocessing.cluster.wire: what the client and the workers of a
-- cluster pool agree on: key names, signed messages, the key check and
-- the heartbeats (docs/cluster.md).
--
-- Keys of queue Q (one hash tag, {Q}, so that a Redis Cluster keeps a
-- queue on one node):
--   mp:{Q}:tasks        stream of tasks, consumer group "workers"
--   mp:{Q}:r:<client>   one client's result stream (expires if it dies)
--   mp:{Q}:hb:<worker>  a worker's heartbeat: "<processes>", with expiry
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
  return { prefix = p, tasks = p .. "tasks", key = p .. "key", hb = p .. "hb:",
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

-- wire.alive(conn, keys) -> machines, workers: heartbeats not expired
function M.alive(conn, keys)
  local cursor, names = "0", {}
  repeat
    local r = conn:call("SCAN", cursor, "MATCH", keys.hb .. "*", "COUNT", 1000)
    if not r then break end
    cursor = r[1]
    for _, k in ipairs(r[2]) do names[#names + 1] = k end
  until cursor == "0"
  local machines, workers, seen = 0, 0, {}
  if #names > 0 then
    local v = conn:call("MGET", table.unpack(names))
    for i, k in ipairs(names) do
      local n = v and tonumber(v[i])
      if n then
        workers = workers + n
        local machine = k:sub(#keys.hb + 1):match("^(.*)/%d+$") or k
        if not seen[machine] then seen[machine] = true; machines = machines + 1 end
      end
    end
  end
  return machines, workers
end

return M
