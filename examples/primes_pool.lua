-- The flagship: count the primes below N (default 3e6, or the first
-- argument) with pool:map over ranges, once with a Pool of 1 worker and
-- once with mp.cpu_count() workers. Prints both counts (equal), both times
-- and the speed-up, e.g.:
--   counting primes below 3000000 in 64 ranges
--   1 worker:    216816 primes in 1.20 s
--   2 workers:   216816 primes in 0.61 s
--   speed-up: 1.97x on 2 CPUs
local mp = require "multiprocessing"
local clock = require("multiprocessing.core").monotonic

local N = math.tointeger(tonumber(arg and arg[1]) or 3e6)
local RANGES = 64

-- is n prime? trial division by 2, 3 and the numbers 6k - 1, 6k + 1
-- (CPU-bound on purpose)
local function is_prime(n)
  if n < 4 then return n > 1 end
  if n % 2 == 0 or n % 3 == 0 then return false end
  for d = 5, math.floor(math.sqrt(n)), 6 do
    if n % d == 0 or n % (d + 2) == 0 then return false end
  end
  return true
end

-- the task: how many primes in [range[1], range[2])
local function count_primes(range)
  local n = 0
  for i = range[1], range[2] - 1 do
    if is_prime(i) then n = n + 1 end
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
