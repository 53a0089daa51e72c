-- What the library's logger tells a person who runs a worker farm: with
-- mp.log_to_stderr("INFO"), process starts and exits, a pool worker's
-- death and its replacement, and a task killed for running past its
-- timeout become one line each on stderr, "[LEVEL/ProcessName pid] ...",
-- from whichever process saw it. The program's own records go to the same
-- logger. Prints (to stderr) lines such as:
--   [INFO/MainProcess 4100] process reporter started (pid 4101, fork)
--   [INFO/reporter 4101] reporting from the child
--   [INFO/MainProcess 4100] process reporter (pid 4101) exited with code 0
--   [INFO/MainProcess 4100] pool worker 1 (pid 4102) exited with code 3; replacing it
--   [WARN/MainProcess 4100] pool worker 2 (pid 4103) killed: a task ran past its timeout of 0.2 s
--   [INFO/MainProcess 4100] pool worker 2 (pid 4103) killed by signal 9; replacing it
-- and at the end (to stdout): "farm done: 4 squares, 1 worker lost, 1 timeout".
local mp = require "multiprocessing"

if mp.is_main() then
  local log = mp.log_to_stderr("INFO")

  -- a process that logs from inside: its records carry its own name
  local p = mp.Process{ name = "reporter", target = function()
    mp.get_logger():info("reporting from the child")
  end }
  p:start(); p:join()

  local pool <close> = mp.Pool(2)
  local squares = pool:map(function(x) return x * x end, { 1, 2, 3, 4 })
  -- a task that takes its worker down: the pool replaces the worker
  local lost = not pcall(pool.apply, pool, function() os.exit(3) end)
  -- a task that runs too long: its worker is killed and replaced
  local r = pool:apply_async(function() while true do end end, {}, { timeout = 0.2 })
  local ok, err = pcall(r.get, r, 30)
  local timed_out = not ok and mp.TimeoutError:is(err)
  log:info("farm done")
  pool:close(); pool:join()
  print(("farm done: %d squares, %d worker lost, %d timeout"):format(
    #squares, lost and 1 or 0, timed_out and 1 or 0))
end
