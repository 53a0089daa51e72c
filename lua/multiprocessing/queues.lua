-- multiprocessing.queues: Queue, SimpleQueue and JoinableQueue.
--
-- The three classes are one C object (csrc/queue.c) with three method
-- sets; this module validates the constructors' arguments and registers
-- the handle kind so that a queue can travel to a spawned child.

local core = require "multiprocessing.core"

local type, error, select, tostring, math_type =
      type, error, select, tostring, math.type

local M = {}
local exports = {}
M.exports = exports

local function check_maxsize(fname, maxsize, nargs)
  if nargs > 1 then
    error("bad argument #2 to '" .. fname .. "' (no value expected)", 3)
  end
  if maxsize == nil then return 0 end
  if math_type(maxsize) ~= "integer" then
    if type(maxsize) == "number" and maxsize == maxsize // 1 and maxsize >= 0
       and maxsize < 2^53 then
      return maxsize // 1 | 0
    end
    error("bad argument #1 to '" .. fname .. "' (maxsize must be an integer >= 0, got "
          .. (type(maxsize) == "number" and tostring(maxsize) or type(maxsize)) .. ")", 3)
  end
  if maxsize < 0 then
    error("bad argument #1 to '" .. fname .. "' (maxsize must be an integer >= 0, got "
          .. maxsize .. ")", 3)
  end
  return maxsize
end

-- mp.Queue([maxsize]) -> Queue (maxsize 0 or nil: unbounded)
function exports.Queue(...)
  return core.queue_new(check_maxsize("Queue", (...), select("#", ...)), "Queue")
end

-- mp.JoinableQueue([maxsize]) -> JoinableQueue
function exports.JoinableQueue(...)
  return core.queue_new(check_maxsize("JoinableQueue", (...), select("#", ...)),
                        "JoinableQueue")
end

-- mp.SimpleQueue() -> SimpleQueue (put, get, empty, close)
function exports.SimpleQueue(...)
  if select("#", ...) > 0 then
    error("bad argument #1 to 'SimpleQueue' (no value expected)", 2)
  end
  return core.queue_new(0, "SimpleQueue")
end

-- A process whose unbounded puts got ahead of the consumers keeps the extra
-- items in a feeder (csrc/queue.c); they are written at its exit.
core.queue_set_exit_hook(function()
  local ok, process = pcall(require, "multiprocessing.process")
  if ok and process._atexit then process._atexit(core.queue_flush_all) end
end)

if core.register_handle then
  core.register_handle("Queue", function(state, fd, efd)
    return core.queue_from_fds(state, fd, efd)
  end)
end

return M
