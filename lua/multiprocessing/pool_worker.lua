-- multiprocessing.pool_worker: a Pool worker's side, in Lua: run the
-- initializer, then serve the slot in C (csrc/pool.c's worker loop).
--
-- A forked worker inherits its Pool and starts in forked_main; a spawned
-- or forkserver worker starts in spawned_main with a plain table (its
-- PoolWorker handle and the initializer, through the codec). spawned_main
-- travels by name (a field of this module), so such a worker loads this
-- small module and never the pool's parent side (docs/design.md,
-- decisions 6 and 10).
-- A task's error goes back to the parent as data (errors.to_data), with
-- the traceback of the task's own frames (decision 9).

local core = require "multiprocessing.core"
local errors = require "multiprocessing.errors"

local error, tostring, xpcall = error, tostring, xpcall
local unpack, traceback = table.unpack, debug.traceback

local M = {}

local RUNNER_LINE = "\n\t%[C%]: in function 'multiprocessing%.core%._pool_runner'"

-- Message handler in a worker: the error as data, with the traceback of
-- the task's own frames only.
local function msgh(err)
  local tb = traceback("", 2)
  local cut = tb:find(RUNNER_LINE)
  if cut then tb = tb:sub(1, cut - 1) end
  tb = tb:gsub("^\n", "")
  return errors.to_data(err, core.getpid(), tb)
end

-- Run init(args...); on error tell the parent (initfail(data)) and leave
-- with the error on stderr (the worker's exit path prints it).
local function initialize(init, args, initfail)
  local ok, data = xpcall(init, msgh, unpack(args, 1, args.n or #args))
  if not ok then
    initfail(data)
    error("Pool initializer failed: " .. tostring(data.message) .. "\n"
          .. tostring(data.traceback), 0)
  end
end

-- pool_worker.forked_main(ref, slot): the target of a forked worker; ref
-- holds the Pool weakly (the caller's frames hold it too)
function M.forked_main(ref, slot)
  local pool = ref[1]
  local pc = pool._pc
  pc:drop_inherited(slot)                 -- other pools, sibling channels
  if pool._initializer then
    initialize(pool._initializer, pool._initargs, function(data) pc:initfail(slot, data) end)
  end
  return pc:worker(slot, pool._maxtasks, pool._maxmem, msgh)
end

-- pool_worker.spawned_main(t): the target of a spawned or forkserver
-- worker; t = { PoolWorker handle, initializer, initargs, maxtasks, maxmem }
function M.spawned_main(t)
  local wh, init = t[1], t[2]
  if init then
    initialize(init, t[3] or {}, function(data) wh:initfail(data) end)
  end
  return wh:serve(t[4], t[5], msgh)
end

return M
