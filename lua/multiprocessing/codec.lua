-- multiprocessing.codec: mp.dumps, mp.loads and mp.register, all in C
-- (csrc/codec.c); this module only exports them. The format, the handle
-- protocol and the limits are described in docs/codec.md.

local core = require "multiprocessing.core"

local M = {}

M.exports = {
  dumps = core.dumps,        -- mp.dumps(v [, name]) -> string [, fds]
  loads = core.loads,        -- mp.loads(s [, {functions=, fds=}]) -> v
  register = core.register,  -- mp.register(name, mt_or_function) -> it
}

-- codec.check(v, name): raise as mp.dumps(v, name) would, and drop the
-- bytes: the library's early checks (a Pool's task arguments, a spawned
-- child's payload) that raise at the caller's line before the value is
-- encoded for real. codec.checking() is true meanwhile, so that a
-- handle's __mp_reduce with side effects (a manager proxy's transit
-- reference) can skip them for bytes nothing will decode.
local checking = 0
function M.check(v, name)
  checking = checking + 1
  local ok, err = pcall(core.dumps, v, name)
  checking = checking - 1
  if not ok then error(err, 0) end
end
function M.checking() return checking > 0 end

return M
