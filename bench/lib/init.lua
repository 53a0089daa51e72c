-- The bench files' side of bench/run.lua's protocol (require "bench.lib",
-- run from the top of the tree, as make bench does).
local clock = require("multiprocessing.core").monotonic

local M = {}

-- One result line: case<TAB>impl<TAB>rate<TAB>unit (rate: higher is better).
function M.emit(case, impl, r, unit)
  io.write(case, "\t", impl, "\t", string.format("%.1f", r), "\t", unit, "\n")
  io.flush()
end

-- Rate of f(n) doing n operations, after an unmeasured run of n/10 when
-- warm is true (to start servers, fill caches).
function M.rate(n, f, warm)
  if warm then f(math.max(1, n // 10)) end
  local t0 = clock()
  f(n)
  return n / (clock() - t0)
end

-- The child of a round-trip case: puts back on b each item it gets from
-- a, n times.
function M.echo(a, b, n)
  for _ = 1, n do b:put(a:get(30)) end
end

-- Seconds that n round trips take through the queues a (there) and b
-- (back) with an echo child, after one unmeasured trip that shows the
-- child runs. a and b: any objects with put and get(timeout).
function M.roundtrips(a, b, n)
  local p = require("multiprocessing").Process{ target = M.echo, args = { a, b, n + 1 } }
  p:start()
  a:put(0); b:get(30)                         -- the child is running
  local t0 = clock()
  for i = 1, n do a:put(i); b:get(30) end
  local dt = clock() - t0
  p:join(30)
  return dt
end

-- Build the C program bench/<name>.c (with extra compiler flags cflags)
-- and run it with args; returns the number it prints (nil when no C
-- compiler is there).
function M.c_rate(name, args, cflags)
  local exe = os.tmpname()
  local rate
  if os.execute("cc -O2 -o " .. exe .. " bench/" .. name .. ".c " .. (cflags or "")
                .. " 2>/dev/null") then
    local f = io.popen(exe .. " " .. args)
    rate = tonumber(f:read("l"))
    f:close()
  end
  os.remove(exe)
  return rate
end

-- The flags that link a C program with Lua 5.4 (bench/forkjoin_lua.c).
M.LUA_CFLAGS = "-I/usr/include/lua5.4 -llua5.4"

return M
