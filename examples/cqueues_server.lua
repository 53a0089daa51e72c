-- A cqueues TCP server that hands each request to a Pool and answers when
-- the request's AsyncResult is ready, never blocking its loop: a coroutine
-- waits with cqueues.poll(r), which the AsyncResult supports (its pool's
-- fd; readable means "try now", and r:ready() never blocks). The same loop
-- runs four clients at once; each sends a bound and reads back the count
-- of primes below it. The small requests are answered while the big one
-- still runs. Prints:
--   client 1: primes below 300000 = 25997
--   client 2: primes below 1000 = 168
--   client 3: primes below 20000 = 2262
--   client 4: primes below 50000 = 5133
--   answered in this order: 2 3 4 1       (the order may vary)
local mp = require "multiprocessing"
local cqueues = require "cqueues"
local socket = require "cqueues.socket"
local condition = require "cqueues.condition"

-- primes below n: each i is tried against the primes found before it, up
-- to its square root (CPU-bound on purpose)
local function count_primes(n)
  local primes = {}
  for i = 2, n - 1 do
    local prime = true
    for _, p in ipairs(primes) do
      if p * p > i then break end
      if i % p == 0 then prime = false break end
    end
    if prime then primes[#primes + 1] = i end
  end
  return #primes
end

if mp.is_main() then
  local pool <close> = mp.Pool(2)
  local loop = cqueues.new()
  local server = socket.listen("127.0.0.1", 0)
  server:listen()
  local _, _, port = server:localname()

  -- the server: one coroutine per connection, one pool task per request
  local function serve(con)
    for line in con:lines() do
      local r = pool:submit(count_primes, tonumber(line))
      while not r:ready() do cqueues.poll(r) end   -- the loop runs on meanwhile
      con:write(r:get(), "\n")
      con:flush()
    end
    con:close()
  end
  local stop, stopping = condition.new(), false
  loop:wrap(function()
    repeat
      local con = server:accept(0)
      if con then loop:wrap(serve, con)
      else cqueues.poll(server, stop) end            -- a client, or the end
    until stopping
    server:close()
  end)

  -- the clients, in the same loop
  local bounds = { 300000, 1000, 20000, 50000 }
  local answers, order = {}, {}
  for i, n in ipairs(bounds) do
    loop:wrap(function()
      local con = socket.connect("127.0.0.1", port)
      con:write(n, "\n")
      con:flush()
      answers[i] = con:read("*l")
      order[#order + 1] = i
      con:close()
      if #order == #bounds then stopping = true; stop:signal() end   -- all answered
    end)
  end

  assert(loop:loop(60))
  assert(loop:empty(), "the loop did not finish in 60 s")
  for i, n in ipairs(bounds) do
    print(("client %d: primes below %d = %s"):format(i, n, answers[i]))
  end
  print("answered in this order: " .. table.concat(order, " "))
end
