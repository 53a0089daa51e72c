-- Chaos family "sigint" (chaos/run.lua): Ctrl-C. A process started by the
-- trial's start method blocks, then gets SIGINT (p:interrupt(), what a
-- terminal's Ctrl-C sends) 50 to 300 ms later; it must have ended 2 s
-- after that (a bound of this trial, not of the library's spec), else it
-- counts as a hang (and is killed with its children). Variants:
--   map    a main program (a lua5.4 of its own) runs pool:map over 100
--          tasks of 0.5 s on a Pool of 2, default chunksize (50 s of
--          work, so a process that goes on with it is noticed); SIGINT
--          goes to it alone
--   wait   a child process waits in Event:wait(30) on an Event nobody sets
-- Under the lua5.4 interpreter SIGINT becomes an "interrupted!" error at
-- the next Lua instruction; the blocked call must let it through.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local lib = require "chaos.lib"

local BOUND = 2

local function set_ready() lib.ready = true end

local function slow(x)
  if lib.ready then                -- the first task of this worker
    lib.ready = nil
    io.write("ready\n")
    io.flush()
  end
  lib.sleep(0.5)
  return x
end

-- The map variant's victim: a main program (lua5.4 chaos/sigint.lua victim
-- <method>), so that the interrupted! error unwinds it as it would a
-- user's program. It writes its pid, then each worker writes "ready" when
-- it begins its first task.
local function map_victim(method)
  mp.set_start_method(method)
  io.write(mp.current_process().pid, "\n")
  io.flush()
  local pool = mp.Pool{ processes = 2, initializer = set_ready }
  local xs = {}
  for i = 1, 100 do xs[i] = i end
  pool:map(slow, xs)
  pool:close()
  pool:join()
end

-- The wait variant's victim: a child process
local function wait_victim(ready, ev)
  ready.value = 1
  ev:wait(30)
end

-- Start the victim; returns interrupt(), ended() and finish() for it.
local function start_victim(variant)
  if variant == "map" then
    local lua = io.open("/proc/self/exe") and "/proc/" .. require("multiprocessing.core").getpid()
      .. "/exe" or "lua5.4"
    local f = io.popen(("exec %s %s victim %s"):format(lua, arg[0], mp.get_start_method()))
    local pid = tonumber(f:read("l"))
    local ready = pid and f:read("l") == "ready"
    return {
      ready = ready,
      interrupt = function() if pid then pcall(core.kill, pid, 2) end end,
      ended = function()
        local s = pid and lib.stat(pid)
        return not s or s.state == "Z"
      end,
      kill = function() if pid then lib.kill_tree(pid) end end,
      close = function() f:close() end,
    }
  end
  local ready, ev = mp.RawValue("int32", 0), mp.Event()
  local p = mp.Process{ target = wait_victim, args = { ready, ev } }
  p:start()
  local waited = lib.settle(function() return ready.value == 1 and {} or { 1 } end, 30)
  return {
    ready = #waited == 0,
    interrupt = function() p:interrupt() end,
    ended = function() return not p:is_alive() end,
    kill = function() lib.kill_tree(p.pid) end,
    close = function() p:join(5); p:close(); ready:close(); ev:close() end,
  }
end

local function trial(method, _, variant)
  local r = { hangs = 0 }
  local v = start_victim(variant)
  if v.ready then lib.sleep(0.05 + math.random() * 0.25) end
  v:interrupt()
  local t0 = lib.now()
  while not v.ended() and lib.now() - t0 < BOUND do lib.sleep(0.01) end
  if not v.ended() then
    io.stderr:write(("chaos: sigint %s %s: still running %d s after SIGINT%s\n"):format(
      method, variant, BOUND, v.ready and "" or " (it never got ready)"))
    r.hangs = 1
    v.kill()
  elseif os.getenv("CHAOS_DEBUG") then
    io.stderr:write(("sigint %s %s: ended %.2f s after SIGINT\n"):format(method, variant,
      lib.now() - t0))
  end
  v.close()
  return r
end

if mp.is_main() then
  if arg[1] == "victim" then map_victim(arg[2]) else lib.batch(trial, 60) end
end
