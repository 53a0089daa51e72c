-- The flagship of `make run`: count the primes below N (default 5e6; pass
-- another as the first argument) with 1 process, then split over
-- mp.cpu_count() processes whose counts come back over Pipes.
-- Prints both counts (equal), both times and the speed-up.
local mp = require "multiprocessing"

local N = math.tointeger(tonumber(arg and arg[1]) or 5e6)

-- primes in [lo, hi): trial division by odd numbers (CPU-bound on purpose)
local function count_primes(lo, hi)
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

local function worker(conn, lo, hi)
  conn:send(count_primes(lo, hi))
  conn:close()
end

-- Split [0, N) into k ranges of about equal work (later numbers cost more).
local function ranges(k)
  local t, lo = {}, 0
  for i = 1, k do
    local hi = i == k and N or math.floor(N * (i / k) ^ (2 / 3))
    t[i] = { lo, hi }
    lo = hi
  end
  return t
end

local function parallel(k)
  local conns, procs = {}, {}
  for i, r in ipairs(ranges(k)) do
    local recv_end, send_end = mp.Pipe(false)
    procs[i] = mp.Process{ target = worker, args = { send_end, r[1], r[2] } }
    procs[i]:start()
    send_end:close()
    conns[i] = recv_end
  end
  local total = 0
  for i = 1, k do
    total = total + assert(conns[i]:recv())
    conns[i]:close()
    procs[i]:join()
  end
  return total
end

if mp.is_main() then
  local k = mp.cpu_count()
  local clock = require("multiprocessing.core").monotonic
  print(("counting primes below %d"):format(N))
  local t0 = clock()
  local one = parallel(1)
  local t1 = clock() - t0
  print(("1 process:   %d primes in %.2f s"):format(one, t1))
  t0 = clock()
  local many = parallel(k)
  local tk = clock() - t0
  print(("%d processes: %d primes in %.2f s"):format(k, many, tk))
  assert(one == many, "the counts differ")
  print(("speed-up: %.2fx on %d CPUs"):format(t1 / tk, k))
end
