-- The cluster pool on Redis (bench/run.lua protocol): 10,000 trivial tasks
-- with two workers (two mp-worker "machines" of one process each), and a
-- single task's round trip. Python's side, RQ and Celery on a Redis
-- started the same way: cluster.py. Needs redis-server (make deps).
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local clock = core.monotonic
local emit = require("bench.lib").emit

if not os.execute("command -v redis-server >/dev/null 2>&1") then
  print("# cluster: redis-server not installed; skipped")
  return
end
local cluster = require "multiprocessing.cluster"

local dir = os.tmpname()
os.remove(dir)
os.execute("mkdir -p " .. dir)
local sock = dir .. "/s"
local pgids = {}
local url = "unix://" .. sock
local keyf = dir .. "/key"

-- Redis and the workers start inside the pcall, so that a failed start
-- still stops whatever did start.
local ok, err = pcall(function()
  assert(os.execute(("redis-server --port 0 --unixsocket %s --dir %s --save '' --appendonly no " ..
    "--daemonize yes --pidfile %s/pid --logfile %s/log"):format(sock, dir, dir, dir)))
  local f = assert(io.open(keyf, "w")); f:write("bench"); f:close()

  local function wait_for(pred)
    local deadline = clock() + 20
    while not pred() do
      assert(clock() < deadline, "cluster bench: timed out")
      core.poll({}, 0.02)
    end
  end
  wait_for(function()
    local c = require("multiprocessing.redis").connect{ path = sock }
    if c then c:close() return true end
  end)
  for i = 1, 2 do
    local pidf = ("%s/w%d.pid"):format(dir, i)
    os.execute(("LUA_PATH=%q LUA_CPATH=%q setsid -f sh -c 'echo $$ > %s; exec %s bin/mp-worker " ..
      "--redis %s --queue bench --processes 1 --authkey-file %s --machine w%d' >/dev/null 2>&1")
      :format(package.path, package.cpath, pidf, os.getenv("LUA") or "lua5.4", url, keyf, i))
    wait_for(function()
      local pf = io.open(pidf)
      pgids[i] = pf and tonumber(pf:read("l"))
      if pf then pf:close() end
      return pgids[i]
    end)
  end

  local pool <close> = cluster.Pool{ redis = url, queue = "bench", authkey = "bench" }
  wait_for(function() return pool:stats().workers >= 2 end)
  local function trivial(x) return x end
  pool:map(trivial, { 1, 2, 3, 4 })       -- warm: both machines up
  local N = 10000
  local xs = {}
  for i = 1, N do xs[i] = i end
  local t0 = clock()
  local r = pool:map(trivial, xs)
  emit("cluster_10k_2workers", "lua-mp", N / (clock() - t0), "tasks/s")
  assert(r.n == N and r[N] == N, "cluster_10k: wrong result")
  local M = 500
  t0 = clock()
  for i = 1, M do
    if pool:apply(trivial, { i }) ~= i then error("cluster_rtt: wrong result") end
  end
  emit("cluster_rtt", "lua-mp", M / (clock() - t0), "ops/s")
  pool:close(); pool:join()
end)
for i = 1, 2 do                           -- a worker whose pid file came late
  local pf = io.open(("%s/w%d.pid"):format(dir, i))
  pgids[i] = pgids[i] or (pf and tonumber(pf:read("l")))
  if pf then pf:close() end
end
for _, g in pairs(pgids) do os.execute("/bin/kill -s INT -- -" .. g .. " 2>/dev/null") end
core.poll({}, 0.5)
for _, g in pairs(pgids) do os.execute("/bin/kill -s KILL -- -" .. g .. " 2>/dev/null") end
local pf = io.open(dir .. "/pid")                  -- Redis, if it started
local rpid = pf and tonumber(pf:read("l"))
if pf then pf:close() end
if rpid then core.kill(rpid, 15) end
os.execute(("redis-cli -s %s shutdown nosave >/dev/null 2>&1; rm -rf %s"):format(sock, dir))
local _ = mp
if not ok then error(err, 0) end
