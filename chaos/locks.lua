-- Chaos family "locks" (chaos/run.lua): a Lock, RLock or Condition held
-- by a process that is SIGKILLed; the next acquire must succeed within a
-- bound. Trial k takes kind (k mod 3) and mode (k div 3 mod 3):
--   held    the holder took the lock (an RLock 1 to 3 times) and sleeps;
--           it is killed 0 to 30 ms after it said so; the trial's own
--           acquire(5) must return true, "abandoned"
--   waiter  the same, while another process waits in acquire(10): that
--           one must get true, "abandoned"
--   churn   the holder takes and releases the lock in a loop and is killed
--           at a random moment; acquire(5) must return true ("abandoned"
--           or not: the holder may have been between two turns)
-- Any other outcome counts as a hang. Semaphores are left out: a slot has
-- no owner, so a dead process's slot is lost by design (docs/sync.md).
local mp = require "multiprocessing"
local lib = require "chaos.lib"

local KINDS = { "Lock", "RLock", "Condition" }
local MODES = { "held", "waiter", "churn" }

local function holder(lock, ready, levels, churn)
  if churn then
    while true do
      lock:acquire()
      ready.value = 1
      lock:release()
    end
  end
  for _ = 1, levels do lock:acquire() end
  ready.value = 1
  lib.sleep(60)
end

local function waiter(lock, state)
  state.value = 1
  local ok, why = lock:acquire(10)
  state.value = ok and (why == "abandoned" and 2 or 3) or 4
  if ok then lock:release() end
end

local function trial(method, k)
  local r = { hangs = 0 }
  local kind = KINDS[(k - 1) % 3 + 1]
  local mode = MODES[(k - 1) // 3 % 3 + 1]
  local lock = mp[kind]()
  local ready, wstate = mp.RawValue("int32", 0), mp.RawValue("int32", 0)
  local levels = kind == "RLock" and math.random(3) or 1
  local h = mp.Process{ target = holder, args = { lock, ready, levels, mode == "churn" } }
  h:start()
  local w
  local ok = lib.settle(function() return ready.value == 1 and {} or { 1 } end, 30)
  if #ok > 0 then
    r.hangs = r.hangs + 1
  else
    if mode == "waiter" then
      w = mp.Process{ target = waiter, args = { lock, wstate } }
      w:start()
      lib.settle(function() return wstate.value == 1 and {} or { 1 } end, 30)
      lib.sleep(0.05)                  -- asleep in acquire by now
    end
    lib.sleep(math.random() * 0.03)
    h:kill()
    h:join(5)
    if w then
      if w:join(15) == nil then w:kill(); w:join(5) end
      if wstate.value ~= 2 then r.hangs = r.hangs + 1 end
      w:close()
    else
      local got, why = lock:acquire(5)
      if not got or (mode == "held" and why ~= "abandoned") then
        io.stderr:write(("chaos: locks %s %s %s: acquire gave %s, %s\n"):format(
          method, kind, mode, tostring(got), tostring(why)))
        r.hangs = r.hangs + 1
      end
      if got then lock:release() end
    end
  end
  if h:is_alive() then h:kill() end
  h:join(5)
  h:close()
  lock:close(); ready:close(); wstate:close()
  return r
end

if mp.is_main() then lib.batch(trial, 60) end
