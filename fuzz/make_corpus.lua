-- Writes the fuzzer's seed corpus, fuzz/corpus/*.bin: mp.dumps of varied
-- values (functions only by name: the harness refuses bytecode anyway, so
-- a few bytecode seeds are enough). Run from the repository root:
--   eval "$(make -s env)"; lua5.4 fuzz/make_corpus.lua
local mp = require "multiprocessing"

local Point = mp.register("fuzz.Point", { __name = "fuzz.Point" })
local Fuzz = { __mp_reduce = function(self) return "fuzz", self.state, 0, 1 end }
local NoFd = { __mp_reduce = function(self) return "fuzz", self.state end }
-- one fd twice in a handle, and handles sharing fds (regression: a copy
-- made for a second user leaked when a later copy failed)
local Dup = { __mp_reduce = function(self) return "fuzz", self.state, 0, 0, 1 end }

local cyc = { name = "cycle" }
cyc.self = cyc
local shared = { 1, 2, 3 }
local deep = {}
do local t = deep for _ = 1, 60 do t[1] = {}; t = t[1] end end
local floats = {}
for i = 1, 64 do floats[i] = i / 7 end
local ints = {}
for i = 1, 64 do ints[i] = (i * 7919) * (i % 2 == 0 and 1 or -1) end

local values = {
  false, true, 0, 127, 128, -1, math.maxinteger, math.mininteger,
  0.0, -0.0, 1 / 0, -1 / 0, 0 / 0, math.pi, "", "short", string.rep("L", 40),
  "\0\1\2\255",
  { 1, 2, 3 }, { a = 1, b = { c = "d" } }, { 1, nil, 3 }, cyc,
  { shared, shared, [shared] = shared }, deep, floats, ints,
  { [true] = false, [1.5] = -1, [-3] = "neg" },
  setmetatable({ x = 1, y = 2 }, Point),
  setmetatable({ state = { "s", 1 } }, Fuzz),
  { setmetatable({ state = 7 }, Fuzz), setmetatable({ state = 8 }, NoFd) },
  { setmetatable({ state = 1 }, Dup), setmetatable({ state = { 2 } }, Fuzz),
    setmetatable({ state = setmetatable({ state = 3 }, Dup) }, Fuzz) },
  string, { string.format, print, mp.dumps }, _G,
  function(x) return x + 1 end,
  { record = { id = 1, name = "rec", score = 9.5, tags = { "a", "b" } } },
}

os.execute("mkdir -p fuzz/corpus")
for i, v in ipairs(values) do
  local s = mp.dumps(v)
  local f = assert(io.open(string.format("fuzz/corpus/seed-%02d.bin", i), "wb"))
  f:write(s)
  f:close()
end
print(#values .. " seeds in fuzz/corpus")
