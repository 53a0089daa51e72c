-- Chaos family "orphans" (chaos/run.lua): a process that starts children
-- (by the trial's start method: plain processes, daemonic ones, a child
-- that starts a grandchild, a Pool of 2 running a map) is SIGKILLed at a
-- random moment of its first 0.6 s. Afterwards nothing it started may be
-- left: a process of the trial's process group (the library never leaves
-- it) that is still alive 3 s after the kill is an orphan, and so is any
-- pid the victim reported (in shared memory) that is still there with a
-- start time after the victim's. Zombies are not counted: an orphan's
-- zombie is init's to reap.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local lib = require "chaos.lib"

local OPS = 12

local function sleeper() lib.sleep(30) end

local function nested()
  local p = mp.Process{ target = sleeper }
  p:start()
  lib.sleep(30)
end

local function victim(pids, seed)
  math.randomseed(seed)
  local function note(pid)
    local n = pids[1] + 1
    if n < #pids then pids[n + 1] = pid; pids[1] = n end
  end
  local keep = {}    -- luacheck: ignore 241 (what it started, kept from the collector)
  for _ = 1, OPS do
    local op = math.random(4)
    if op == 4 then
      local pool = mp.Pool{ processes = 2, initializer = function() end }
      keep[#keep + 1] = pool
      pool:map_async(function(x) lib.sleep(0.01) return x end, { 1, 2, 3, 4 }, 1)
    else
      local p = mp.Process{ target = op == 3 and nested or sleeper, daemon = op == 2 }
      p:start()
      note(p.pid)
      keep[#keep + 1] = p
    end
    lib.sleep(math.random() * 0.03)
  end
  lib.sleep(30)
end

local function trial(method, k)
  local r = { hangs = 0 }
  local me = core.getpid()
  local except = { [me] = true }
  local s = lib.stat(me)
  while s and s.pid ~= s.pgrp do         -- the trial's ancestors in the group
    s = lib.stat(s.ppid)
    if s then except[s.pid] = true end
  end
  local pids = mp.RawArray("int64", 64)
  local v = mp.Process{ target = victim, args = { pids, k }, start_method = "fork" }
  v:start()
  local vstart = lib.stat(v.pid).start
  lib.sleep(math.random() * 0.6)
  v:kill()
  if v:join(5) == nil then r.hangs = r.hangs + 1 end
  v:close()
  local pgrp = lib.stat(me).pgrp
  local left = lib.settle(function() return lib.group(pgrp, except) end, 3)
  local seen = {}
  for _, p in ipairs(left) do seen[p.pid] = true end
  for i = 2, pids[1] + 1 do
    local p = lib.stat(pids[i])
    if p and not seen[p.pid] and p.state ~= "Z" and p.start >= vstart then
      left[#left + 1] = p
    end
  end
  if #left > 0 then
    local names = {}
    for _, p in ipairs(left) do names[#names + 1] = p.pid .. " " .. p.comm end
    io.stderr:write(("chaos: orphans %s: left after the kill: %s\n"):format(
      method, table.concat(names, ", ")))
  end
  lib.kill_all(left)
  pids:close()
  r.procs = #left
  return r
end

if mp.is_main() then lib.batch(trial, 60) end
