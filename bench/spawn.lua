-- Start+join under the spawn and forkserver start methods, beside a raw
-- posix_spawn of `lua5.4 -e ''` (no library, no bootstrap) measured in the
-- same run, for bench/run.lua. Spawned children re-run this chunk, so the
-- work is under the guard.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local spawn = require "multiprocessing.spawn"

local bench = require "bench.lib"
local emit = bench.emit
-- the fork server requires what this chunk requires (as bench/spawn.py has
-- Python's preload its helper module)
spawn.set_forkserver_preload({ "bench.lib" })
-- warmed up first (which also starts the fork server)
local function rate(n, f) return bench.rate(n, f, true) end

local function nothing() end

local function start_join(method)
  return function(n)
    for _ = 1, n do
      local p = mp.Process{ target = nothing, start_method = method }
      p:start(); p:join(); p:close()
    end
  end
end

-- The floor: posix_spawn of the interpreter running an empty chunk, and
-- the wait for it, through the same C calls spawn uses.
local function raw_spawn(n)
  local exe = spawn.get_executable()
  for _ = 1, n do
    local p = core.process_new({ name = "raw" })
    local a, b = core._socketpair()
    p:_spawn(exe, { exe, "-e", "" }, b)
    b:close(); a:close()
    p:join(); p:close()
  end
end

if mp.is_main() then
  emit("spawn_start_join", "posix_spawn", rate(300, raw_spawn), "ops/s")
  emit("spawn_start_join", "lua-mp", rate(300, start_join("spawn")), "ops/s")
  emit("forkserver_start_join", "lua-mp", rate(300, start_join("forkserver")), "ops/s")
end
