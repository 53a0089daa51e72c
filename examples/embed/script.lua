-- Run by examples/embed/host (a C program embedding Lua): spawned children
-- are the host program too, so they can call its C function host.add.
-- Prints: 3 lines "child <pid>: host.add(i, 10*i) = 11*i", then
--         "sum from 3 spawned children: 66"
local mp = require "multiprocessing"
-- host is a global that every state of the host program has (a global, not
-- an upvalue, so that each spawned child uses its own)
-- luacheck: read globals host

local function work(q, a, b)
  q:put({ pid = mp.current_process().pid, a = a, b = b, sum = host.add(a, b) })
end

if mp.is_main() then
  mp.set_start_method("spawn")
  local q = mp.Queue()
  local procs = {}
  for i = 1, 3 do
    procs[i] = mp.Process{ target = work, args = { q, i, 10 * i } }
    procs[i]:start()
  end
  local results, total = {}, 0
  for i = 1, 3 do
    local r = assert(q:get(10), "no answer from a child")
    results[i] = r
    total = total + r.sum
  end
  table.sort(results, function(x, y) return x.a < y.a end)
  for _, r in ipairs(results) do
    print(("child %d: host.add(%d, %d) = %d"):format(r.pid, r.a, r.b, r.sum))
  end
  for i = 1, 3 do procs[i]:join(10) end
  print("sum from 3 spawned children: " .. math.tointeger(total))
end
