-- What travels between processes: a closure with its upvalues (two
-- functions sharing one counter stay sharing), a registered class, a
-- module function by name, and what mp.dumps refuses, with the path.
-- Prints:
--   child: counter says 3, point norm 7, string.rep by name: abab
--   refused: value.log: cannot serialize userdata (FILE*)
local mp = require "multiprocessing"

local Point = mp.register("example.Point", {})
Point.__index = Point
function Point:norm1() return math.abs(self.x) + math.abs(self.y) end

local function child(conn)
  local job = conn:recv(5)
  job.bump(); job.bump(); job.bump()          -- bump and get share `count`
  conn:send(string.format("counter says %d, point norm %d, string.rep by name: %s",
    job.get(), job.point:norm1(), job.rep("ab", 2)))
  conn:close()
end

if mp.is_main() then
  local count = 0
  local job = {
    bump = function() count = count + 1 end,
    get = function() return count end,
    point = setmetatable({ x = 3, y = -4 }, Point),
    rep = string.rep,                         -- a C function: by name
  }
  local here, there = mp.Pipe()
  local p = mp.Process{ target = child, args = { there } }
  p:start()
  there:close()
  here:send(job)
  print("child: " .. here:recv(5))
  p:join(5)
  here:close()

  local ok, err = pcall(mp.dumps, { log = io.stderr })
  print("refused: " .. (ok and "nothing?" or err.message))
end
