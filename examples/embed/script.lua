-- Run by examples/embed/host (a C program embedding Lua): the Pool's
-- workers are spawned, and spawned children are the host program too, so
-- the tasks can call its C function host.add.
-- Prints: 3 lines "worker <pid>: host.add(i, 10*i) = 11*i" (pids of the
--         workers, not of the host), then
--         "sum from 3 tasks in spawned Pool workers: 66"
local mp = require "multiprocessing"
-- host is a global that every state of the host program has (a global, not
-- an upvalue, so that each worker uses its own)
-- luacheck: read globals host

local function add_in_worker(i)
  return mp.current_process().pid, host.add(i, 10 * i)
end

if mp.is_main() then
  mp.set_start_method("spawn")
  local pool <close> = mp.Pool(2)
  local total = 0
  for i, pid, sum in pool:imap(add_in_worker, { 1, 2, 3 }) do
    assert(pid ~= mp.current_process().pid, "the task ran in the host process")
    print(("worker %d: host.add(%d, %d) = %d"):format(pid, i, 10 * i, sum))
    total = total + sum
  end
  pool:close()
  pool:join()
  print("sum from 3 tasks in spawned Pool workers: " .. math.tointeger(total))
end
