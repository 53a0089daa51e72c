-- make bench: runs every bench/<area>.lua and bench/<area>.py several times
-- (BENCH_ROUNDS, default 5), each printing lines "case<TAB>impl<TAB>rate<TAB>unit"
-- (rates: higher is better), and prints per case the median rate of each
-- implementation and its ratio to ours ("lua-mp"). Lines starting with '#'
-- are passed through once (exactness checks and notes).
-- BENCH_ONLY=codec,pool limits the areas.
-- BENCH_BEFORE=dir (a built checkout of an earlier commit) runs each Lua
-- bench file a second time in the same round against that tree's library,
-- reporting its lua-mp rates as impl "before": a before/after comparison
-- within one run.
local rounds = tonumber(os.getenv("BENCH_ROUNDS")) or 5
local only = os.getenv("BENCH_ONLY")
local before = os.getenv("BENCH_BEFORE")

local function files()
  local p = io.popen("ls bench/*.lua bench/*.py 2>/dev/null")
  local t = {}
  for f in p:lines() do
    local area = f:match("^bench/(.-)%.[lp][uy]a?$")
    if f ~= "bench/run.lua" and area
       and (not only or (("," .. only .. ","):find("," .. area .. ",", 1, true))) then
      t[#t + 1] = f
    end
  end
  p:close()
  table.sort(t)
  return t
end

local samples, units, order, notes, seen_note = {}, {}, {}, {}, {}
local lua = os.getenv("LUA") or "lua5.4"
-- Run one bench program; as_before: keep only its lua-mp lines, as "before".
local function run(cmd, as_before)
  local p = io.popen(cmd)
  for line in p:lines() do
    if line:sub(1, 1) == "#" then
      if not as_before and not seen_note[line] then
        seen_note[line] = true; notes[#notes + 1] = line
      end
    else
      local case, impl, rate, unit = line:match("^([^\t]+)\t([^\t]+)\t([^\t]+)\t([^\t]+)$")
      rate = tonumber(rate)
      if as_before then impl = impl == "lua-mp" and "before" or nil end
      if case and impl and rate then
        if not samples[case] then samples[case] = {}; order[#order + 1] = case end
        samples[case][impl] = samples[case][impl] or {}
        table.insert(samples[case][impl], rate)
        units[case] = unit
      end
    end
  end
  p:close()
end

for round = 1, rounds do
  for _, f in ipairs(files()) do
    local cmd = (f:match("%.py$") and "python3 " or lua .. " ") .. f
    io.stderr:write(("round %d/%d: %s\n"):format(round, rounds, cmd))
    run(cmd, false)
    if before and f:match("%.lua$") then
      io.stderr:write(("round %d/%d: %s (before: %s)\n"):format(round, rounds, cmd, before))
      run(("LUA_PATH=%q LUA_CPATH=%q %s"):format(before .. "/lua/?.lua;" .. before
          .. "/lua/?/init.lua;./?.lua;./?/init.lua;;", before .. "/lua/?.so;;", cmd), true)
    end
  end
end

local function median(t)
  table.sort(t)
  local n = #t
  if n % 2 == 1 then return t[(n + 1) // 2] end
  return (t[n // 2] + t[n // 2 + 1]) / 2
end

local function fmt(x)
  if x >= 1e6 then return ("%.2fM"):format(x / 1e6) end
  if x >= 1e3 then return ("%.1fk"):format(x / 1e3) end
  return ("%.1f"):format(x)
end

print(("%d rounds, medians; ratio = lua-mp rate / other rate (higher is better for us)"):format(rounds))
print(("%-22s %-14s %12s  %-7s %s"):format("case", "impl", "rate", "unit", "lua-mp is"))
for _, case in ipairs(order) do
  local impls = {}
  for impl in pairs(samples[case]) do impls[#impls + 1] = impl end
  table.sort(impls, function(a, b)
    if a == "lua-mp" then return true elseif b == "lua-mp" then return false end
    return a < b
  end)
  local ours = samples[case]["lua-mp"] and median(samples[case]["lua-mp"])
  for _, impl in ipairs(impls) do
    local m = median(samples[case][impl])
    local ratio = ""
    if ours and impl ~= "lua-mp" then ratio = ("%.2fx"):format(ours / m) end
    print(("%-22s %-14s %12s  %-7s %s"):format(case, impl, fmt(m), units[case], ratio))
  end
end
for _, n in ipairs(notes) do print(n) end
