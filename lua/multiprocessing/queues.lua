-- multiprocessing.queues: Queue, SimpleQueue and JoinableQueue.
--
-- The three classes are one C object (csrc/queue.c) with three method
-- sets; this module validates the constructors' arguments and registers
-- the handle kind so that a queue can travel to a spawned child.

local core = require "multiprocessing.core"
local check = require "multiprocessing.check"
local polling = require "multiprocessing.polling"

local select, pcall, require, ipairs = select, pcall, require, ipairs

local M = {}
local exports = {}
M.exports = exports

-- the maxsize argument of fname (level 3: the caller of fname)
local function maxsize(fname, ...)
  check.nargs(select("#", ...), 1, fname, 3)
  return check.integer((...), 1, fname, "maxsize", 0, nil, 3) or 0
end

-- mp.Queue([maxsize]) -> Queue (maxsize 0 or nil: unbounded)
function exports.Queue(...)
  return core.queue_new(maxsize("Queue", ...), "Queue")
end

-- mp.JoinableQueue([maxsize]) -> JoinableQueue
function exports.JoinableQueue(...)
  return core.queue_new(maxsize("JoinableQueue", ...), "JoinableQueue")
end

-- mp.SimpleQueue() -> SimpleQueue (put, get, empty, close)
function exports.SimpleQueue(...)
  check.nargs(select("#", ...), 0, "SimpleQueue")
  return core.queue_new(0, "SimpleQueue")
end

-- The polling protocol of cqueues (q:pollfd(), q:events(), q:timeout()):
-- the queue's eventfd, readable while it holds items (fileno() registers
-- this process as a watcher, csrc/queue.c). timeout() is 0 when a get
-- would not wait now, so a poll returns at once; when it would, _ready
-- clears a stale eventfd (another consumer took the item), so a poller
-- sleeps instead of spinning. Readable means "try now": a get(0) may
-- still say "empty" when another consumer was quicker.
local function timeout(q) if q:_ready() then return 0 end end
for _, kind in ipairs { "Queue", "SimpleQueue", "JoinableQueue" } do
  local methods = core[kind .. "_methods"]
  methods.pollfd = polling.pollfd_method(methods.fileno)
  methods.events, methods.timeout = polling.events, timeout
  polling.cancel_on_close(methods, "multiprocessing." .. kind)
end

-- A process whose unbounded puts got ahead of the consumers keeps the extra
-- items in a feeder (csrc/queue.c); they are written at its exit.
core.queue_set_exit_hook(function()
  local ok, process = pcall(require, "multiprocessing.process")
  if ok and process._atexit then process._atexit(core.queue_flush_all) end
end)

return M
