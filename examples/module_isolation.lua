-- What a child sees of the main program's state under each start method:
-- the guarded main block sets a variable of a required module (mp_module)
-- and a global. A fork child is a copy of the parent, so it sees both; a
-- spawn or forkserver child re-runs this chunk without the guarded block,
-- so it sees the module's initial value and the global as the top level
-- left it.
-- Prints, for fork, spawn and forkserver (or the method given as arg[1]):
--   fork:        module value = set by the main block, global = set by the main block
--   spawn:       module value = the module's initial value, global = top level
--   forkserver:  module value = the module's initial value, global = top level
package.path = (arg[0]:match("^(.*/)") or "./") .. "?.lua;" .. package.path
local mp = require "multiprocessing"
local mp_module = require "mp_module"
-- luacheck: globals SETTING

SETTING = "top level"

local function show(conn, method)
  conn:send(("%-12s module value = %s, global = %s"):format(
    method .. ":", mp_module.report(), SETTING))
end

if mp.is_main() then
  mp_module.value = "set by the main block"
  SETTING = "set by the main block"
  local methods = arg[1] and { arg[1] } or mp.get_all_start_methods()
  for _, method in ipairs(methods) do
    local ctx = mp.get_context(method)
    local r, w = ctx.Pipe(false)
    local p = ctx.Process{ target = show, args = { w, method } }
    p:start()
    w:close()
    print(r:recv(10))
    p:join(10)
  end
end
