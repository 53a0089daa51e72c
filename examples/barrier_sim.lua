-- A Barrier-stepped simulation: 4 worker processes each own a slice of a
-- 1-D heat grid in a shared Array. At every step each computes its slice
-- of the next grid from the current one, then all meet at a Barrier whose
-- action (run once per step, by whichever worker arrives last) swaps the
-- grids and prints every 25th step.
-- Prints the grid at steps 25, 50, 75, 100 (heat spreading out from the
-- middle cell), then "total heat 1000.0 (conserved)".
local mp = require "multiprocessing"

local N, WORKERS, STEPS = 16, 4, 100

local function show(grids, cur, step)
  local t = {}
  for i = 1, N do t[i] = string.format("%6.1f", grids[cur.value * N + i]) end
  print(string.format("step %3d:", step.value) .. table.concat(t))
  io.flush()
end

local function worker(id, grids, cur, barrier)
  local lo, hi = (id - 1) * (N // WORKERS) + 1, id * (N // WORKERS)
  for _ = 1, STEPS do
    local s, d = cur.value * N, (1 - cur.value) * N
    for i = lo, hi do
      local here = grids[s + i]
      local left = i > 1 and grids[s + i - 1] or here
      local right = i < N and grids[s + i + 1] or here
      grids[d + i] = here + 0.25 * (left - 2 * here + right)
    end
    assert(barrier:wait(10), "barrier broken")
  end
end

if mp.is_main() then
  local grids = mp.RawArray("double", 2 * N)   -- two grids: current, next
  local cur = mp.RawValue("int32", 0)          -- which one is current (0/1)
  local step = mp.RawValue("int32", 0)
  grids[N // 2] = 1000.0
  local barrier = mp.Barrier(WORKERS, function()
    cur.value = 1 - cur.value
    step.value = step.value + 1
    if step.value % 25 == 0 then show(grids, cur, step) end
  end)
  local procs = {}
  for id = 1, WORKERS do
    procs[id] = mp.Process{ target = worker, args = { id, grids, cur, barrier } }
    procs[id]:start()
  end
  for _, p in ipairs(procs) do p:join() end
  local total = 0
  for i = 1, N do total = total + grids[cur.value * N + i] end
  print(string.format("total heat %.1f (conserved)", total))
end
