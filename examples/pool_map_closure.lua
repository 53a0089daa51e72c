-- pool:map over a closure: the function goes to the workers with its
-- upvalues (copied by value), once per map, not once per item. Also shows
-- starmap, imap over an iterator (consumed lazily) and a task's error.
-- Prints:
--   1  hello ana (x3 = ana ana ana)
--   2  hello bo (x3 = bo bo bo)
--   3  hello cy (x3 = cy cy cy)
--   starmap: 6 20 42
--   imap: 1 1 | 2 4 | 3 9 | 4 16 | 5 25
--   error from the worker: RemoteError ... no negative numbers
local mp = require "multiprocessing"

if mp.is_main() then
  local pool <close> = mp.Pool(2)         -- terminated when the block ends

  local greeting, times = "hello", 3
  local lines = pool:map(function(name)
    return ("%s %s (x%d = %s)"):format(greeting, name, times,
                                        (name .. " "):rep(times):sub(1, -2))
  end, { "ana", "bo", "cy" })
  for i, s in ipairs(lines) do print(i, s) end

  local products = pool:starmap(function(a, b) return a * b end, { { 2, 3 }, { 4, 5 }, { 6, 7 } })
  print("starmap: " .. table.concat(products, " "))

  local n = 0
  local function numbers()                -- an iterator: pulled as workers need
    if n < 5 then n = n + 1; return n end
  end
  local parts = {}
  for i, sq in pool:imap(function(x) return x * x end, numbers) do
    parts[#parts + 1] = i .. " " .. sq
  end
  print("imap: " .. table.concat(parts, " | "))

  local ok, err = pcall(pool.map, pool, function(x)
    if x < 0 then error("no negative numbers") end
    return math.sqrt(x)
  end, { 4, -1, 9 })
  print("error from the worker: " .. (ok and "none" or (err.type .. " " .. err.message)))
end
