-- Codec benchmarks (bench/run.lua protocol: case<TAB>impl<TAB>rate<TAB>unit):
--   record     encode+decode round trips/s of a nested record of about 100
--              entries (integers, floats, short strings, a list of 50
--              numbers): mp.dumps/mp.loads vs lua-cjson
--   floats10k  round trips/s of an array of 10,000 floats: mp.dumps/loads
--              vs string.pack/string.unpack of the same floats
-- Exactness of each round trip is printed as '#' lines.
-- Rates are per second of CPU time (os.clock): these cases use one process
-- and no I/O, and CPU time is far less disturbed by a busy machine than the
-- wall clock. bench/codec.py does the same (time.process_time).
local mp = require "multiprocessing"
local clock = os.clock
local dumps, loads = mp.dumps, mp.loads
local ok_cjson, cjson = pcall(require, "cjson")

local emit = require("bench.lib").emit

-- Rate of f() calls per second over about `secs` seconds.
local function rate(f, secs)
  local n, t0 = 0, clock()
  local batch = 1
  repeat
    for _ = 1, batch do f() end
    n = n + batch
    if batch < 1024 then batch = batch * 2 end
  until clock() - t0 >= secs
  return n / (clock() - t0)
end

local function same(a, b)
  if math.type(a) ~= math.type(b) or type(a) ~= type(b) then return false end
  if type(a) ~= "table" then
    if a ~= a then return b ~= b end
    return a == b and (a ~= 0 or 1 / a == 1 / b)
  end
  for k, v in pairs(a) do if not same(v, b[k]) then return false end end
  for k in pairs(b) do if a[k] == nil then return false end end
  return true
end

-- The record: the same shape as in bench/codec.py.
local function make_record()
  local r = { id = 123456, name = "benchmark record", active = true }
  for i = 1, 30 do r["int_" .. i] = i * 1000 + i end
  for i = 1, 30 do r["float_" .. i] = i / 3 + 0.125 end
  for i = 1, 30 do r["str_" .. i] = "value-" .. i end
  local list = {}
  for i = 1, 50 do list[i] = i % 2 == 0 and i * 1.5 or i end
  r.list = list
  r.nested = { x = 1.25, y = -2.5, label = "point" }
  return r
end

local secs = tonumber(os.getenv("BENCH_SECONDS")) or 1.5
local record = make_record()

emit("record", "lua-mp", rate(function() loads(dumps(record)) end, secs), "ops/s")
local exact = { "lua-mp " .. (same(record, loads(dumps(record))) and "yes" or "no") }
if ok_cjson then
  local enc, dec = cjson.encode, cjson.decode
  emit("record", "cjson", rate(function() dec(enc(record)) end, secs), "ops/s")
  exact[#exact + 1] = "cjson " .. (same(record, dec(enc(record))) and "yes" or "no")
end
io.write("# record exact: ", table.concat(exact, ", "), "\n")

local N = 10000
local floats = {}
for i = 1, N do floats[i] = (i * 7919 % 10007) / 7 - 500.25 end
local fmt = "<" .. string.rep("d", N)
local pack, unpack, tunpack = string.pack, string.unpack, table.unpack

emit("floats10k", "lua-mp", rate(function() loads(dumps(floats)) end, secs), "ops/s")
local function packrt()
  local t = { unpack(fmt, pack(fmt, tunpack(floats, 1, N))) }
  t[N + 1] = nil                       -- string.unpack's next position
  return t
end
emit("floats10k", "string.pack", rate(packrt, secs), "ops/s")
io.write("# floats10k exact: lua-mp ", same(floats, loads(dumps(floats))) and "yes" or "no",
         ", string.pack ", same(floats, packrt()) and "yes" or "no", "\n")
