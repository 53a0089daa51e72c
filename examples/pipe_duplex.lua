-- A duplex Pipe between two processes that send and answer: the child
-- sends a greeting, the parent answers, the child prints the answer.
local mp = require "multiprocessing"

local function child(conn)
  conn:send("hello from " .. mp.current_process().pid)
  print("child got:", conn:recv())
  conn:close()
end

if mp.is_main() then
  local parent_end, child_end = mp.Pipe()
  local p = mp.Process{ target = child, args = { child_end } }
  p:start()
  child_end:close()                  -- the child has its own copy
  print("parent got:", parent_end:recv())
  parent_end:send("hello back from " .. mp.current_process().pid)
  p:join()
  parent_end:close()
end
