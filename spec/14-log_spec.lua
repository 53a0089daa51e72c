-- The library's logger: mp.get_logger, mp.log_to_stderr, mp.set_logger
-- (docs/api.md, "Logging"), with the Debian package lua-logging as the
-- LuaLogging logger a program already has.
local H = require "helpers"

-- lua-logging installs its pure-Lua modules for Lua 5.1 and 5.2 only;
-- they run unchanged on 5.4.
local LUALOGGING_PATH = "/usr/share/lua/5.2/?.lua;"

describe("logging", function()
  it("is silent until told where to write, at level WARN", function()
    local out, code = H.run_lua([[
      local mp = require "multiprocessing"
      local log = mp.get_logger()
      assert(log.level == "WARN" and log:getLevel() == "WARN")
      log:warn("not shown %d", 1)
      log:error("not shown either")
      print("done")
    ]])
    assert.are.equal(0, code)
    assert.are.equal("done\n", out)
  end)

  it("log_to_stderr writes [LEVEL/ProcessName pid] lines at its level", function()
    local out, code = H.run_lua([[
      local mp = require "multiprocessing"
      local log = mp.log_to_stderr("INFO")
      assert(log == mp.get_logger())
      log:debug("dropped")
      log:info("hello %s %d", "world", 42)
      log:warn(function(a) return "lazy " .. a end, "text")
      log:error({})                 -- any value: tostring
      log:setLevel("ERROR")
      log:warn("dropped too")
      log:log("FATAL", "last")
    ]])
    assert.are.equal(0, code)
    local lines = {}
    for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.are.equal(4, #lines, out)
    assert.matches("^%[INFO/MainProcess %d+%] hello world 42$", lines[1])
    assert.matches("^%[WARN/MainProcess %d+%] lazy text$", lines[2])
    assert.matches("^%[ERROR/MainProcess %d+%] table: ", lines[3])
    assert.matches("^%[FATAL/MainProcess %d+%] last$", lines[4])
  end)

  it("accepts Python's level names and refuses unknown ones", function()
    local mp = require "multiprocessing"
    local log = mp.get_logger()
    local old = log:getLevel()
    log:setLevel("warning")
    assert.are.equal("WARN", log:getLevel())
    log:setLevel("CRITICAL")
    assert.are.equal("FATAL", log:getLevel())
    assert.has_error(function() log:setLevel("LOUD") end,
      "bad argument #1 to 'setLevel' (level must be DEBUG, INFO, WARN, ERROR, FATAL or OFF, got LOUD)")
    local ok, err = pcall(function() mp.log_to_stderr(3) end)
    assert.is_false(ok)
    assert.truthy(err:find("log_spec.lua:%d+: bad argument #1 to 'log_to_stderr' %(level must be"))
    assert.truthy(err:find("got number", 1, true))
    log:setLevel(old)
  end)

  it("records from many processes never interleave mid-line", function()
    local out, code = H.run_lua([[
      local mp = require "multiprocessing"
      mp.log_to_stderr("INFO")
      local body = string.rep("x", 300)
      local ps = {}
      for i = 1, 4 do
        ps[i] = mp.Process{target = function()
          for k = 1, 200 do mp.get_logger():info("%d %d %s", i, k, body) end
        end}
        ps[i]:start()
      end
      for i = 1, 4 do assert(ps[i]:join(30) == 0) end
    ]], 60)
    assert.are.equal(0, code)
    local n, counts = 0, {}
    for l in out:gmatch("[^\n]*\n") do
      -- the children's records, and the library's own about them
      local name, i = l:match("^%[INFO/(Process%-%d+) %d+%] (%d) %d+ x+\n$")
      if name then
        assert.are.equal(300, #l:match("(x+)\n$"))
        counts[i] = (counts[i] or 0) + 1
        n = n + 1
      else
        assert.truthy(l:match("^%[INFO/MainProcess %d+%] process Process%-%d ") and
                      (l:match(" started %(pid %d+, fork%)\n$") or
                       l:match(" exited with code 0\n$")),
                      "a mangled line: " .. l:sub(1, 80))
      end
    end
    assert.are.equal(800, n)
    for i = 1, 4 do assert.are.equal(200, counts[tostring(i)]) end
  end)

  it("a spawned child logs at its parent's level to stderr", function()
    local out, code = H.run_lua([[
      local mp = require "multiprocessing"
      local function child() mp.get_logger():info("child says %d", 7) end
      if mp.is_main() then
        mp.log_to_stderr("INFO")
        local ctx = mp.get_context("spawn")
        local p = ctx.Process{target = child}
        p:start()
        assert(p:join(30) == 0)
      end
    ]], 60)
    assert.are.equal(0, code)
    assert.matches("%[INFO/Process%-1 %d+%] child says 7\n", out)
  end)

  it("hands records to a LuaLogging logger given to set_logger", function()
    local out, code = H.run_lua([[
      package.path = "]] .. LUALOGGING_PATH .. [[" .. package.path
      local logging = require "logging"
      local seen = {}
      local ll = logging.new(function(_, level, message)
        seen[#seen + 1] = level .. ":" .. message
        return true
      end)
      local mp = require "multiprocessing"
      assert(mp.set_logger(ll) == ll)
      local log = mp.get_logger()
      log:setLevel("INFO")           -- the library's level; ll keeps its own
      log:debug("dropped")
      log:info("n=%d", 5)
      log:error("bad")
      print(table.concat(seen, ","))
      print(mp.set_logger(nil) == log)
    ]])
    assert.are.equal(0, code, out)
    assert.are.equal("INFO:n=5,ERROR:bad\ntrue\n", out)
  end)

  it("records process starts and exits, pool worker deaths, replacements "
     .. "and timeout kills, and the fork server's start and stop", function()
    local out, code = H.run_lua([[
      local mp = require "multiprocessing"
      if mp.is_main() then
        mp.log_to_stderr("INFO")
        local p = mp.Process{target = function() end, name = "quick"}
        p:start(); assert(p:join(30) == 0)
        p = mp.Process{target = function() while true do end end,
                       name = "doomed"}
        p:start(); p:kill(); assert(p:join(30) == -9)
        local pool = mp.Pool(1)
        local r = pool:apply_async(function() while true do end end, {}, {timeout = 0.1})
        assert(not pcall(r.get, r, 30))
        pool:close(); pool:join()
        p = mp.get_context("forkserver").Process{target = function() end, name = "served"}
        p:start(); assert(p:join(30) == 0)
        require("multiprocessing.spawn")._forkserver_stop()
      end
    ]], 60)
    assert.are.equal(0, code, out)
    local want = {
      "%[INFO/MainProcess %d+%] process quick started %(pid %d+, fork%)\n",
      "%[INFO/MainProcess %d+%] process quick %(pid %d+%) exited with code 0\n",
      "%[INFO/MainProcess %d+%] process doomed %(pid %d+%) ended by signal 9\n",
      "%[WARN/MainProcess %d+%] pool worker 1 %(pid %d+%) killed: a task ran past its "
        .. "timeout of 0.1 s\n",
      "%[INFO/MainProcess %d+%] pool worker 1 %(pid %d+%) killed by signal 9; replacing it\n",
      "%[INFO/MainProcess %d+%] fork server started %(pid %d+%)\n",
      "%[INFO/MainProcess %d+%] process served started %(pid %d+, forkserver%)\n",
      "%[INFO/MainProcess %d+%] fork server %(pid %d+%) stopped, exit code 0\n",
    }
    for _, pat in ipairs(want) do assert.matches(pat, out) end
  end)

  it("set_logger refuses what is not a logger", function()
    local mp = require "multiprocessing"
    assert.has_error(function() mp.set_logger(42) end, "bad argument #1 to 'set_logger' "
      .. "(a logger with debug/info/warn/error/fatal methods expected, got number)")
    assert.has_error(function() mp.set_logger({}) end, "bad argument #1 to 'set_logger' "
      .. "(a logger with debug/info/warn/error/fatal methods expected, got table)")
  end)
end)
