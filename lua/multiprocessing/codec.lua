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


return M
