-- The flagship across machines: count the primes below N (default 3e6, or
-- the first argument) with a cluster pool's map over 64 ranges, on the
-- workers that serve the queue "primes" of the Redis at $MP_REDIS (default
-- redis://127.0.0.1:6379/0) with the key in $MP_AUTHKEY. Start workers on
-- each machine first:
--   MP_AUTHKEY=... mp-worker --redis redis://10.0.0.5:6379/0 --queue primes
-- `make run-cluster` starts a Redis and two worker "machines" and runs this.
-- Prints the count and which machine counted how many ranges, e.g.:
--   216816 primes below 3000000 in 1.71 s
--   alpha: 33 ranges
--   beta: 31 ranges
local cluster = require "multiprocessing.cluster"
local clock = require("multiprocessing.core").monotonic

local N = math.tointeger(tonumber(arg and arg[1]) or 3e6)
local RANGES = 64

-- primes in [lo, hi), and the machine that counted them (its workers'
-- MP_MACHINE, set by make run-cluster; else the worker's parent pid)
local function count_primes(range)
  local lo, hi = range[1], range[2]
  local n = 0
  if lo <= 2 and hi > 2 then n = 1 end
  local i = lo > 3 and lo or 3
  if i % 2 == 0 then i = i + 1 end
  while i < hi do
    local prime, d = true, 3
    while d * d <= i do
      if i % d == 0 then prime = false break end
      d = d + 2
    end
    if prime then n = n + 1 end
    i = i + 2
  end
  return { n, os.getenv("MP_MACHINE") or ("pid " .. require("multiprocessing.core").getppid()) }
end

local pool <close> = cluster.Pool{
  redis = os.getenv("MP_REDIS") or "redis://127.0.0.1:6379/0",
  queue = "primes",
  authkey = assert(os.getenv("MP_AUTHKEY"), "set MP_AUTHKEY"),
}
local ranges = {}
for k = 1, RANGES do ranges[k] = { (k - 1) * N // RANGES, k * N // RANGES } end
local t0 = clock()
local results = pool:map(count_primes, ranges, 1)
local total, by = 0, {}
for _, r in ipairs(results) do
  total = total + r[1]
  by[r[2]] = (by[r[2]] or 0) + 1
end
print(("%d primes below %d in %.2f s"):format(total, N, clock() - t0))
local names = {}
for name in pairs(by) do names[#names + 1] = name end
table.sort(names)
for _, name in ipairs(names) do print(("%s: %d ranges"):format(name, by[name])) end
pool:close(); pool:join()
