-- A process started twice: the second start raises "cannot start a
-- process twice", and the first start still runs its target.
-- Prints the error, then "target_func" from the child.
local mp = require "multiprocessing"

local function target_func()
  print("target_func")
end

if mp.is_main() then
  local p = mp.Process{ target = target_func, name = "process_start_test" }
  p:start()
  local ok, err = pcall(p.start, p)
  print("second start:", ok, tostring(err))
  p:join()
end
