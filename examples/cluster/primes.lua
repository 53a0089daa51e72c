-- The flagship across machines: count the primes below N (default 3e6, or
-- the first argument) with a cluster pool's map over 64 ranges, on the
-- workers that serve the queue "primes" of the Redis at $MP_REDIS (default
-- redis://127.0.0.1:6379/0) with the key in $MP_AUTHKEY. Start workers on
-- each machine first:
--   MP_AUTHKEY=... mp-worker --redis redis://10.0.0.5:6379/0 --queue primes
-- `make run-cluster` starts a Redis and two worker "machines" and runs this.
-- Prints the count and which machine counted how many ranges, e.g.:
--   216816 primes below 3000000 in 0.16 s
--   alpha: 33 ranges
--   beta: 31 ranges
local cluster = require "multiprocessing.cluster"
local clock = require("multiprocessing.core").monotonic

local N = math.tointeger(tonumber(arg and arg[1]) or 3e6)
local RANGES = 64

-- primes in [lo, hi), by a sieve of the range: cross out the multiples of
-- every d up to sqrt(hi); and the machine that counted them (its workers'
-- MP_MACHINE, set by make run-cluster; else the worker's parent pid)
local function count_primes(range)
  local lo, hi = math.max(range[1], 2), range[2]
  local composite = {}
  for d = 2, math.floor(math.sqrt(hi - 1)) do
    for m = math.max(d * d, (lo + d - 1) // d * d), hi - 1, d do composite[m] = true end
  end
  local n = 0
  for i = lo, hi - 1 do
    if not composite[i] then n = n + 1 end
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
