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

-- Pool frames' values (csrc/pool.h; the harness's second reading): a byte
-- of claimed fds, then values: plain ones in the codec's bytes, others as
-- POOL_MSG (0x3f, u32 length, message) or, holding handles, POOL_MSGFD
-- (0x3e, the same, then u8 k and k positions in the frame's fds).
local function msg(v)
  local m, fds = mp.dumps(v)
  if not fds then return "\x3f" .. string.pack("=I4", #m) .. m end
  local pos = {}
  for i = 1, #fds do pos[i] = string.char((i - 1) % 2) end
  return "\x3e" .. string.pack("=I4", #m) .. m .. string.char(#fds) .. table.concat(pos)
end
local frames = {
  "\0" .. "\x81\x82" .. msg({ 1, 2 }),
  "\2" .. msg(setmetatable({ state = "q" }, Fuzz)) .. "\x80",
  "\2" .. msg({ setmetatable({ state = 1 }, Dup), setmetatable({ state = 2 }, Fuzz) }),
  "\1" .. msg(setmetatable({ state = 1 }, Fuzz)),      -- names fd 2 of 1 claimed
  "\3" .. msg(true),                                     -- claims more than came
}
for i, fr in ipairs(frames) do
  local f = assert(io.open(string.format("fuzz/corpus/pool-%02d.bin", i), "wb"))
  f:write(fr)
  f:close()
end
print(#values .. " seeds and " .. #frames .. " pool frames in fuzz/corpus")
