-- The same server as cqueues_server.lua, with luv (libuv): a uv.new_tcp
-- server hands each request to a Pool, and uv.new_poll watches the pool's
-- fd: when it is readable, pool:poll() takes the news in without blocking
-- and runs the done callbacks (r:add_done_callback), which write the
-- answers. The same loop runs four clients at once. Prints:
--   client 1: primes below 300000 = 25997
--   client 2: primes below 1000 = 168
--   client 3: primes below 20000 = 2262
--   client 4: primes below 50000 = 5133
--   answered in this order: 2 3 4 1       (the order may vary)
local mp = require "multiprocessing"
local uv = require "luv"

-- primes below n, by the sieve of Eratosthenes
local function count_primes(n)
  local composite, count = {}, 0
  for i = 2, n - 1 do
    if not composite[i] then
      count = count + 1
      for m = i * i, n - 1, i do composite[m] = true end
    end
  end
  return count
end

-- Call f(line) for each whole line that arrives on stream (nil at its end).
local function read_lines(stream, f)
  local buf = ""
  stream:read_start(function(err, chunk)
    assert(not err, err)
    if not chunk then return f(nil) end
    buf = buf .. chunk
    for line in buf:gmatch("(.-)\n") do f(line) end
    buf = buf:match("[^\n]*$")
  end)
end

if mp.is_main() then
  local pool <close> = mp.Pool(2)
  -- the pool's news wakes the loop; poll() runs the done callbacks
  local news = uv.new_poll(pool:fileno())
  news:start("r", function() pool:poll() end)

  -- the server: one pool task per request, answered by its done callback
  local server = uv.new_tcp()
  assert(server:bind("127.0.0.1", 0))
  local port = server:getsockname().port
  assert(server:listen(16, function(err)
    assert(not err, err)
    local con = uv.new_tcp()
    server:accept(con)
    read_lines(con, function(line)
      if not line then con:close() return end     -- the client hung up
      pool:submit(count_primes, tonumber(line)):add_done_callback(function(r)
        con:write(r:get() .. "\n")
      end)
    end)
  end))

  -- the clients, in the same loop
  local bounds = { 300000, 1000, 20000, 50000 }
  local answers, order = {}, {}
  for i, n in ipairs(bounds) do
    local con = uv.new_tcp()
    con:connect("127.0.0.1", port, function(err)
      assert(not err, err)
      con:write(n .. "\n")
      read_lines(con, function(line)
        answers[i] = line
        order[#order + 1] = i
        con:close()
        if #order == #bounds then               -- all answered: stop serving
          news:close()                          -- (before the pool closes its fd)
          server:close()
        end
      end)
    end)
  end

  local guard = uv.new_timer()                  -- never wait more than 60 s
  guard:start(60000, 0, function() error("no answer in 60 s") end)
  guard:unref()
  uv.run()                                      -- until every handle is closed
  for i, n in ipairs(bounds) do
    print(("client %d: primes below %d = %s"):format(i, n, answers[i]))
  end
  print("answered in this order: " .. table.concat(order, " "))
end
