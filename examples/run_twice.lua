-- run() executes the target in the calling process, as often as called;
-- only start() makes a new process. Prints the same pid three times.
local mp = require "multiprocessing"

local function show(tag)
  print(tag, "in process", mp.current_process().pid)
end

if mp.is_main() then
  local p = mp.Process{ target = show, args = { "run" } }
  p:run()
  p:run()
  show("main")
end
