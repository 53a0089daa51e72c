-- Process start+join and Pipe round trips (the foundation), for bench/run.lua.
local mp = require "multiprocessing"

local bench = require "bench.lib"
local rate, emit = bench.rate, bench.emit

emit("fork_start_join", "lua-mp", rate(300, function(n)
  for _ = 1, n do
    local p = mp.Process{ target = function() end }
    p:start(); p:join(); p:close()
  end
end), "ops/s")
-- the floors: fork, _exit and waitpid in C (bench/forkjoin.c), and the
-- same from a C program holding a Lua state with this library loaded
-- (bench/forkjoin_lua.c): what any Lua process pays to fork
local floor = bench.c_rate("forkjoin", "300 1")
if floor then emit("fork_start_join", "c-fork", floor, "ops/s") end
floor = bench.c_rate("forkjoin_lua", "300", bench.LUA_CFLAGS)
if floor then emit("fork_start_join", "c-fork-lua", floor, "ops/s") end
-- and with the child calling an empty Lua function before it exits
floor = bench.c_rate("forkjoin_lua", "300 call", bench.LUA_CFLAGS)
if floor then emit("fork_start_join", "c-fork-lua-call", floor, "ops/s") end

-- An echo child: values (recv/send) or raw bytes, until "stop".
local function with_echo(bytes, f)
  local a, b = mp.Pipe()
  local p = mp.Process{ target = function(c)
    local recv, send = bytes and c.recv_bytes or c.recv, bytes and c.send_bytes or c.send
    while true do
      local v = recv(c)
      if v == "stop" then break end
      send(c, v)
    end
  end, args = { b } }
  p:start()
  f(a)
  if bytes then a:send_bytes("stop") else a:send("stop") end
  p:join()
  a:close(); b:close()
end

with_echo(false, function(a)
  emit("pipe_rtt_small", "lua-mp", rate(20000, function(n)
    for i = 1, n do a:send(i); a:recv() end
  end), "ops/s")
end)
-- the floor: one byte each way over a socketpair, in C (bench/pingpong.c)
floor = bench.c_rate("pingpong", "100000 socket")
if floor then emit("pipe_rtt_small", "c-socketpair", floor, "ops/s") end

with_echo(true, function(a)
  local mib = string.rep("x", 1 << 20)
  emit("pipe_1mib", "lua-mp", rate(300, function(n)
    for _ = 1, n do a:send_bytes(mib); a:recv_bytes() end
  end) * 2, "MiB/s")
end)
