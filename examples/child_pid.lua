-- A child prints its pid and its parent's; the parent waits for it.
-- Prints: Parent process P. / Child process will start. /
--         Run child process test (C), parent P... / Child process end.
local mp = require "multiprocessing"

local function run_proc(name)
  print(("Run child process %s (%d), parent %d..."):format(
    name, mp.current_process().pid, mp.parent_process().pid))
end

if mp.is_main() then
  print(("Parent process %d."):format(mp.current_process().pid))
  local p = mp.Process{ target = run_proc, args = { "test" } }
  print("Child process will start.")
  p:start()
  p:join()
  print("Child process end.")
end
