-- multiprocessing.polling: what the waitables share to speak cqueues'
-- polling protocol (docs/eventloops.md).
--
-- Each waitable (Connection, Listener, Process, the queues, Pool,
-- AsyncResult) has pollfd(), events() and timeout(), and fileno() for
-- luv. A cqueues controller keeps a descriptor it polled installed until
-- the polling coroutine yields again or ends, and a descriptor closed
-- while installed corrupts the controller's books (the next step fails
-- with EBADF; cqueues' manual: cancel before close). cqueues' own objects
-- cancel their descriptors when they close; ours do too: pollfd()
-- remembers the descriptor it gave, and close() (a `<close>` variable's
-- end too, and a Pool's terminate and join) first hands it to
-- cqueues.cancel, which also wakes a coroutine still polling it. An
-- object never polled pays one table look-up at its close. Nothing here
-- loads cqueues.

local setmetatable, pcall = setmetatable, pcall
local loaded = package.loaded
local registry = debug.getregistry()

local M = {}

-- events() -> "r": every waitable is waited for to read (or to end)
function M.events() return "r" end

local polled = setmetatable({}, { __mode = "k" })   -- object -> fd given to a poller

-- polling.remember(obj, fd) -> fd: obj's pollfd gave fd
function M.remember(obj, fd)
  polled[obj] = fd
  return fd
end

-- polling.forget(obj): obj's descriptor is about to close: cancel it in
-- cqueues' controllers if obj's pollfd gave it to one
function M.forget(obj)
  local fd = polled[obj]
  if fd then
    polled[obj] = nil
    local cqueues = loaded.cqueues
    if cqueues then pcall(cqueues.cancel, fd) end
  end
end
local forget = M.forget

-- polling.cancel_on_close(methods [, tname]): methods.close, and the
-- __close of the metatable named tname, forget the object's descriptor
-- before they close it
function M.cancel_on_close(methods, tname)
  local close = methods.close
  methods.close = function(self, ...)
    if polled[self] then forget(self) end
    return close(self, ...)
  end
  local mt = tname and registry[tname]
  if mt and mt.__close then
    local mclose = mt.__close
    mt.__close = function(self, e)
      if polled[self] then forget(self) end
      return mclose(self, e)
    end
  end
end

-- polling.pollfd_method(fileno) -> a pollfd method: fileno's descriptor,
-- remembered
function M.pollfd_method(fileno)
  return function(self) polled[self] = fileno(self); return polled[self] end
end

return M
