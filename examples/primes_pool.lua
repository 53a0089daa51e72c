-- The flagship: count the primes below N (default 3e6, or the first
-- argument) with pool:map over ranges, once with a Pool of 1 worker and
-- once with mp.cpu_count() workers. Prints both counts (equal), both times
-- and the speed-up, e.g.:
--   counting primes below 3000000 in 64 ranges
--   1 worker:    216816 primes in 3.10 s
--   2 workers:   216816 primes in 1.58 s
--   speed-up: 1.96x on 2 CPUs
local mp = require "multiprocessing"
local clock = require("multiprocessing.core").monotonic

local N = math.tointeger(tonumber(arg and arg[1]) or 3e6)
local RANGES = 64

-- primes in [lo, hi): trial division by odd numbers (CPU-bound on purpose)
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
  return n
end

local function count_with(workers)
  local ranges = {}
  for k = 1, RANGES do
    ranges[k] = { (k - 1) * N // RANGES, k * N // RANGES }
  end
  local pool <close> = mp.Pool(workers)
  local t0 = clock()
  local counts = pool:map(count_primes, ranges, 1)
  local total = 0
  for k = 1, RANGES do total = total + counts[k] end
  return total, clock() - t0
end

if mp.is_main() then
  local cpus = mp.cpu_count()
  print(("counting primes below %d in %d ranges"):format(N, RANGES))
  local one, t1 = count_with(1)
  print(("1 worker:    %d primes in %.2f s"):format(one, t1))
  local many, tk = count_with(cpus)
  print(("%d workers:%s %d primes in %.2f s"):format(cpus, cpus < 10 and "  " or " ", many, tk))
  assert(one == many, "the counts differ")
  print(("speed-up: %.2fx on %d CPUs"):format(t1 / tk, cpus))
end
