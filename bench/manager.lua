-- bench/manager.lua: a manager's proxies (mp.Manager) against Python's
-- multiprocessing.Manager() (bench/manager.py): a dict set+get round trip,
-- 4 processes incrementing one counter (d:incr against Python's
-- `with lock: d['n'] += 1`, totals checked), and a Queue put+get round trip
-- between two processes. Beside the last two, their floors in C
-- (bench/relay.c, impl "c-relay"): the same hops, one byte each, through a
-- third process that does nothing else. Prints <case>\t<impl>\t<rate>\t<unit>.
local mp = require "multiprocessing"
local lib = require "bench.lib"
local now = require("multiprocessing.core").monotonic

local function dict_roundtrip(m, n)
  local d = m:dict()
  return lib.rate(n, function(k)
    for i = 1, k do
      d.key = i
      local _ = d.key
    end
  end, true)
end

local PROCS, EACH = 4, 2000

local function incr(m)
  local d = m:dict{ n = 0 }
  local go = m:Event()
  local ps = {}
  for i = 1, PROCS do
    ps[i] = mp.Process{ target = function(dd, g)
      g:wait(30)
      for _ = 1, EACH do dd:incr("n") end
    end, args = { d, go } }
    ps[i]:start()
  end
  local t0 = now()
  go:set()
  for i = 1, PROCS do ps[i]:join(120) end
  local dt = now() - t0
  return d.n, PROCS * EACH / dt
end

local function queue_roundtrip(m, n)
  return n / lib.roundtrips(m:Queue(), m:Queue(), n)
end

if mp.is_main() then
  local m <close> = mp.Manager()
  lib.emit("manager_dict_setget", "lua-mp", dict_roundtrip(m, 20000), "pairs/s")
  local total, rate = incr(m)
  lib.emit("manager_incr_4x2000", "lua-mp", rate, "incr/s")
  print(("# manager_incr_4x2000: lua-mp total %d (expected %d)%s"):format(
    total, PROCS * EACH, total == PROCS * EACH and "" or " WRONG"))
  local floor = lib.c_rate("relay", ("fanin %d %d"):format(EACH, PROCS))
  if floor then lib.emit("manager_incr_4x2000", "c-relay", floor, "incr/s") end
  lib.emit("manager_queue_rt", "lua-mp", queue_roundtrip(m, 10000), "rt/s")
  floor = lib.c_rate("relay", "chain 10000")
  if floor then lib.emit("manager_queue_rt", "c-relay", floor, "rt/s") end
end
