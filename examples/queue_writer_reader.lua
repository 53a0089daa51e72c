-- A writer process puts three values on a Queue while a reader process
-- takes them off; the reader loops forever, so the parent terminates it
-- once the writer is done and the queue has drained.
-- Prints (the pids vary; reader and writer lines may interleave):
--   Process to write: 12345
--   Put A to queue...
--   Process to read: 12346
--   Get A from queue.
--   Put B to queue...
--   Get B from queue.
--   Put C to queue...
--   Get C from queue.
local mp = require "multiprocessing"

local function write(q)
  print("Process to write: " .. mp.current_process().pid)
  for _, value in ipairs{ "A", "B", "C" } do
    print("Put " .. value .. " to queue...")
    io.flush()
    q:put(value)
    os.execute("sleep 0." .. math.random(1, 3))
  end
end

local function read(q)
  print("Process to read: " .. mp.current_process().pid)
  io.flush()
  while true do
    local value = q:get()                  -- blocks until there is one
    print("Get " .. value .. " from queue.")
    io.flush()
  end
end

if mp.is_main() then
  local q = mp.Queue()
  local pw = mp.Process{ target = write, args = { q } }
  local pr = mp.Process{ target = read, args = { q } }
  pw:start()
  pr:start()
  pw:join()
  -- the reader never returns by itself: wait until it took everything,
  -- then stop it
  local deadline = os.time() + 5
  while not q:empty() and os.time() < deadline do os.execute("sleep 0.01") end
  os.execute("sleep 0.05")                 -- let it print the last line
  pr:terminate()
  pr:join()
  q:close()
end
