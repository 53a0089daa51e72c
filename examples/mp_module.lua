-- A module for examples/module_isolation.lua: one variable that the main
-- program's guarded block changes. Run alone it prints nothing.
local M = {}
M.value = "the module's initial value"

function M.report()
  return M.value
end

return M
