-- make chaos: fault and attack trials (docs/reliability.md). Runs each
-- trial family of chaos/<file>.lua under the start methods it involves, as
-- `lua5.4 chaos/<file>.lua <method> <n> <seed> [variant]` under timeout(1)
-- (a process group of its own, and a backstop: each trial also has its
-- own watchdog, see chaos/lib.lua), and prints one table: per row, the
-- trials run and what went wrong. Exits 1 if anything did ("in flight" is
-- not a failure: see chaos/queues.lua).
--
-- Options (environment; make chaos passes ROUNDS=, TRIALS=, ONLY=,
-- METHODS=, SEED= as CHAOS_*):
--   CHAOS_ROUNDS=x     every row's default trial count times x (default 1)
--   CHAOS_TRIALS=n     n trials per row; or family=n,family=n for some
--   CHAOS_ONLY=a,b     only these families
--   CHAOS_METHODS=a,b  only these start methods
--   CHAOS_SEED=n       the random seed (default: the time; printed)
--   CHAOS_LOG=path     where the trials' stderr goes (build/chaos.log)
local lua = os.getenv("LUA") or "lua5.4"
local function env(name)
  local v = os.getenv(name)
  return v ~= "" and v or nil
end
local scale = tonumber(env("CHAOS_ROUNDS")) or 1
local seed = tonumber(env("CHAOS_SEED")) or os.time() % 100000
local LOG = env("CHAOS_LOG") or "build/chaos.log"

local function set_of(s)
  if not s then return nil end
  local t = {}
  for w in s:gmatch("[^,%s]+") do t[w] = true end
  return t
end
local only, methods_only = set_of(env("CHAOS_ONLY")), set_of(env("CHAOS_METHODS"))
local trials_all, trials_of = nil, {}
do
  local s = env("CHAOS_TRIALS")
  if s and tonumber(s) then
    trials_all = tonumber(s)
  elseif s then
    for fam, n in s:gmatch("([%w_]+)=(%d+)") do trials_of[fam] = tonumber(n) end
  end
end

local ALL = { "fork", "spawn", "forkserver" }
-- family, file, variant, start methods, default trials (per method), and
-- the per-trial bound the batch uses (for the backstop)
local FAMILIES = {
  { "queues", "queues", nil, ALL, 12, 120 },
  { "locks", "locks", nil, ALL, 27, 60 },
  { "orphans", "orphans", nil, ALL, 20, 60 },
  { "pool", "pool", nil, ALL, { fork = 60, spawn = 60, forkserver = 600 }, 250 },
  { "hostile", "hostile", "bytes", { "fork" }, 10, 120 },
  { "handles", "hostile", "handles", { "fork" }, 30, 120 },
  { "handshake", "hostile", "idle", { "fork" }, 6, 120 },
  { "sigint-map", "sigint", "map", ALL, 3, 60 },
  { "sigint-wait", "sigint", "wait", ALL, 3, 60 },
}

local FIELDS = { "lost", "dup", "hangs", "crashes", "procs", "fds", "inflight" }

-- Live processes of process group g (after a batch: nothing may be left).
local function group_left(g)
  local p = io.popen("ls /proc")
  local pids = {}
  for l in p:lines() do pids[#pids + 1] = tonumber(l) end
  p:close()
  local left = {}
  for _, pid in ipairs(pids) do
    local f = io.open("/proc/" .. pid .. "/stat")
    local s = f and f:read("l")
    if f then f:close() end
    local st, pgrp
    if s then st, pgrp = s:match("^%d+ %(.*%) (%S) %d+ (%d+)") end
    if pgrp and tonumber(pgrp) == g and st ~= "Z" then left[#left + 1] = pid end
  end
  return left
end

local core = require "multiprocessing.core"
local function sleep(s) core.poll({}, s) end

-- Run n trials of one row; returns the summed counts and the trials run.
local function run_row(fam, method, n, bound)
  local sum = {}
  for _, f in ipairs(FIELDS) do sum[f] = 0 end
  local done, restarts = 0, 0
  while done < n and restarts <= 3 do
    local out = os.tmpname()
    local cmd = ("timeout -k 5 %d %s chaos/%s.lua %s %d %d %s >%s 2>>%s"):format(
      (n - done) * bound + 60, lua, fam[2], method, n - done, seed + done, fam[3] or "",
      out, LOG)
    local _, _, code = os.execute(cmd)
    local f = io.open(out)
    local text = f and f:read("a") or ""
    if f then f:close() end
    os.remove(out)
    local group, ended, got = tonumber(text:match("^group (%d+)")), false, 0
    for line in text:gmatch("[^\n]+") do
      if line == "end" then ended = true end
      local nums = {}
      for w in line:gmatch("%-?%d+") do nums[#nums + 1] = tonumber(w) end
      if line:match("^trial ") and #nums == 1 + #FIELDS then
        got = got + 1
        for i, fld in ipairs(FIELDS) do sum[fld] = sum[fld] + nums[i + 1] end
      end
    end
    done = done + got
    if not ended then              -- the batch itself died or hung
      local lf = io.open(LOG, "a")
      lf:write(("chaos: run.lua: %s %s: the batch ended with code %s after %d trials\n"):format(
        fam[1], method, tostring(code), got))
      lf:close()
      if code == 124 or code == 137 then sum.hangs = sum.hangs + 1
      else sum.crashes = sum.crashes + 1 end
      done = done + 1              -- the trial it was in counts
      restarts = restarts + 1
    end
    if group then
      local left = group_left(group)
      for _ = 1, 20 do
        if #left == 0 then break end
        sleep(0.1)
        left = group_left(group)
      end
      sum.procs = sum.procs + #left
      for _, pid in ipairs(left) do os.execute("kill -9 " .. pid .. " 2>/dev/null") end
    end
  end
  return sum, done
end

if not env("CHAOS_LOG") then os.execute("mkdir -p build") end
local lf = assert(io.open(LOG, "w"))
lf:write(("make chaos, seed %d\n"):format(seed))
lf:close()

local rows = {}
local clock = core.monotonic
local t0 = clock()
for _, fam in ipairs(FAMILIES) do
  if not only or only[fam[1]] then
    for _, method in ipairs(fam[4]) do
      if not methods_only or methods_only[method] or #fam[4] == 1 then
        local n = trials_all or trials_of[fam[1]]
        if not n then
          local d = type(fam[5]) == "table" and fam[5][method] or fam[5]
          n = math.max(1, math.floor(d * scale + 0.5))
        end
        local t1 = clock()
        local sum, done = run_row(fam, method, n, fam[6])
        io.stderr:write(("chaos: %-12s %-10s %4d trials %7.1f s\n"):format(fam[1],
          #fam[4] > 1 and method or "", done, clock() - t1))
        rows[#rows + 1] = { fam = fam[1], method = #fam[4] > 1 and method or "-",
                            trials = done, sum = sum }
      end
    end
  end
end

local fail = false
print(("make chaos: seed %d, %.0f s; counts are totals over the trials (docs/reliability.md)")
  :format(seed, clock() - t0))
print(("%-12s %-10s %6s %5s %5s %5s %7s %6s %6s %9s"):format("family", "method", "trials",
  "lost", "dup", "hangs", "crashes", "procs", "fds", "in flight"))
for _, r in ipairs(rows) do
  local s = r.sum
  for _, f in ipairs(FIELDS) do
    if f ~= "inflight" and s[f] ~= 0 then fail = true end
  end
  print(("%-12s %-10s %6d %5d %5d %5d %7d %6d %6d %9s"):format(r.fam, r.method, r.trials,
    s.lost, s.dup, s.hangs, s.crashes, s.procs, s.fds,
    r.fam == "queues" and tostring(s.inflight) or "-"))
end
print(("procs, fds: leaked processes and fds (and /dev/shm entries); log: %s"):format(LOG))
os.exit(fail and 1 or 0)
