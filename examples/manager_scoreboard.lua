-- Game-server workers share one scoreboard held by a manager (mp.Manager):
-- each adds its players' points with board:incr (atomic in the manager)
-- and records its last round under the scoreboard's lock. Game server 3 is
-- killed (SIGKILL) while it holds that lock, its round half done: the
-- manager releases the lock, and the worker whose acquire gets it next
-- is told "abandoned" and repairs the round. Prints the kill, who found
-- the lock abandoned, the repair, and each player's points (exact: 350).
local mp = require "multiprocessing"

local PLAYERS = { "ada", "bob", "cy" }

-- take the lock; if its holder died, finish the round it left half done
local function take(who, lock, rounds)
  local _, state = lock:acquire()
  if state == "abandoned" then
    local last = rounds.last
    print(("%s: lock abandoned; repairing round %d of server %d")
          :format(who, last.round, last.server))
    last.done = true
    rounds.last = last
  end
end

local function game_server(id, board, rounds, lock, inlock)
  for r = 1, 100 do
    for _, name in ipairs(PLAYERS) do board:incr(name, 1) end
    take("game server " .. id, lock, rounds)
    rounds.last = { server = id, round = r, done = false }
    if id == 3 and r == 50 then
      inlock:set()                      -- holding the lock, half done: killed here
      mp.Event():wait(60)
    end
    rounds.last = { server = id, round = r, done = true }
    lock:release()
  end
end

if mp.is_main() then
  local m <close> = mp.Manager()
  local board, rounds = m:dict(), m:dict()
  local lock, inlock = m:Lock(), m:Event()
  local workers = {}
  for id = 1, 4 do
    workers[id] = mp.Process{ target = game_server, args = { id, board, rounds, lock, inlock } }
    workers[id]:start()
  end
  inlock:wait(30)
  workers[3]:kill()
  print("killed game server 3 while it held the scoreboard's lock")
  for id = 1, 4 do workers[id]:join(30) end
  take("main", lock, rounds)            -- in case no worker came after the kill
  lock:release()
  for _, name in ipairs(PLAYERS) do
    print(("%-4s %d points"):format(name, board[name]))   -- 3 servers x 100 + 50
  end
end
