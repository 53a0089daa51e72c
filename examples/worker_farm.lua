-- A game-server style worker farm: requests keep arriving and are served
-- by a Pool while, now and then, a random worker is killed with SIGKILL.
-- A killed worker's request fails with WorkerLostError (naming its pid and
-- exit code -9) and is sent again; a new worker takes the dead one's place;
-- every request is answered. The main loop is an event loop: it submits,
-- calls pool:poll() and reacts in callbacks. Prints something like:
--   killed worker 5123
--   request 57 lost with worker 5123 (exit code -9): retrying
--   ...
--   300 requests, 300 answered, 4 retried, 0 unanswered; 6 workers replaced
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

-- A request: a few milliseconds of work, then a reply.
local function serve(id, payload)
  mp.wait({}, 0.001 + (id % 7) * 0.001)
  return id, payload * 2
end

if mp.is_main() then
  math.randomseed(42)
  local pool = mp.Pool(4)
  local N = 300
  local answered, retried, answers = 0, 0, {}

  local submit
  local function on_reply(id, value)
    if not answers[id] then answers[id] = value; answered = answered + 1 end
  end
  function submit(id)
    pool:apply_async(serve, { id, id }, {
      callback = on_reply,
      error_callback = function(err)
        if mp.WorkerLostError:is(err) then
          print(("request %d lost with worker %d (exit code %d): retrying")
                :format(id, err.pid, err.exitcode))
          retried = retried + 1
          submit(id)
        else
          error(err)
        end
      end,
    })
  end

  local next_id, deadline = 1, core.monotonic() + 8
  while answered < N and core.monotonic() < deadline do
    for _ = 1, 5 do                       -- a burst of new requests
      if next_id <= N then submit(next_id); next_id = next_id + 1 end
    end
    if math.random() < 0.05 then          -- chaos: kill a random worker
      local kids = mp.active_children()
      local victim = kids[math.random(#kids)]
      if victim then
        print(("killed worker %d"):format(victim.pid))
        core.kill(victim.pid, 9)
      end
    end
    pool:poll(0.005)                      -- wait for news, run callbacks
  end
  local s = pool:stats()
  pool:close()
  pool:join()
  local missing = 0
  for id = 1, N do if answers[id] ~= id * 2 then missing = missing + 1 end end
  print(("%d requests, %d answered, %d retried, %d unanswered; %d workers replaced")
        :format(N, answered, retried, missing, s.restarts))
  if missing > 0 then os.exit(1) end
end
