-- Every example runs and exits 0; the seed programs print what they say.
local H = require "helpers"

local function run(file, args)
  local p = io.popen(("LUA_PATH=%q LUA_CPATH=%q timeout 60 lua5.4 %s %s 2>&1; echo \"exit:$?\"")
                     :format(package.path, package.cpath, file, args or ""))
  local out = p:read("a")
  p:close()
  local code = tonumber(out:match("exit:(%d+)\n?$"))
  return out:gsub("exit:%d+\n?$", ""), code
end

describe("examples", function()
  local checks = {
    ["examples/start_twice.lua"] = function(out)
      assert.truthy(out:find("second start:\tfalse\tProcessError: cannot start a process twice", 1, true))
      assert.truthy(out:find("target_func", 1, true))
    end,
    ["examples/run_twice.lua"] = function(out)
      local pids = {}
      for pid in out:gmatch("in process\t(%d+)") do pids[#pids + 1] = pid end
      assert.are.equal(3, #pids)
      assert.are.equal(pids[1], pids[2])
      assert.are.equal(pids[1], pids[3])
    end,
    ["examples/child_pid.lua"] = function(out)
      local parent = out:match("Parent process (%d+)%.")
      local child, pp = out:match("Run child process test %((%d+)%), parent (%d+)")
      assert.is_not_nil(parent)
      assert.are.equal(parent, pp)
      assert.are_not.equal(parent, child)
      assert.truthy(out:find("Child process end.", 1, true))
    end,
    ["examples/pipe_duplex.lua"] = function(out)
      local child = out:match("parent got:\thello from (%d+)")
      local parent = out:match("child got:\thello back from (%d+)")
      assert.is_not_nil(child)
      assert.is_not_nil(parent)
      assert.are_not.equal(child, parent)
    end,
  }
  checks["examples/lock_print.lua"] = function(out)
    for i = 1, 5 do
      local n = select(2, out:gsub("hello world " .. i .. "\n", ""))
      assert.are.equal(1, n, out)     -- whole lines: never interleaved
    end
  end
  checks["examples/value_counter.lua"] = function(out)
    assert.truthy(out:find("counter = 40000", 1, true), out)
  end
  checks["examples/barrier_sim.lua"] = function(out)
    assert.truthy(out:find("total heat 1000.0 (conserved)", 1, true), out)
  end
  checks["examples/logging_farm.lua"] = function(out)
    assert.truthy(out:find("farm done: 4 squares, 1 worker lost, 1 timeout", 1, true), out)
    assert.matches("%[INFO/reporter %d+%] reporting from the child\n", out)
    assert.matches("%[INFO/MainProcess %d+%] process reporter %(pid %d+%) exited with code 0\n", out)
    assert.matches("%[INFO/MainProcess %d+%] pool worker %d %(pid %d+%) exited with code 3; replacing it\n", out)
    assert.matches("%[WARN/MainProcess %d+%] pool worker %d %(pid %d+%) killed: a task ran past its timeout of 0.2 s\n", out)
    assert.matches("%[INFO/MainProcess %d+%] pool worker %d %(pid %d+%) killed by signal 9; replacing it\n", out)
  end
  checks["examples/manager_scoreboard.lua"] = function(out)
    assert.truthy(out:find("killed game server 3 while it held", 1, true), out)
    assert.truthy(out:find("lock abandoned; repairing round 50 of server 3", 1, true), out)
    for _, name in ipairs({ "ada", "bob", "cy" }) do
      assert.truthy(out:find(("%-4s 350 points"):format(name), 1, true), out)
    end
  end
  -- the two event-loop servers print the same: every client's answer,
  -- and the order the answers came in (a permutation of the clients)
  local function served(out)
    for _, want in ipairs { "client 1: primes below 300000 = 25997\n",
                            "client 2: primes below 1000 = 168\n",
                            "client 3: primes below 20000 = 2262\n",
                            "client 4: primes below 50000 = 5133\n" } do
      assert.truthy(out:find(want, 1, true), out)
    end
    local order = out:match("answered in this order: ([%d ]+)\n")
    assert.is_not_nil(order, out)
    local seen = {}
    for i in order:gmatch("%d+") do seen[#seen + 1] = tonumber(i) end
    table.sort(seen)
    assert.are.same({ 1, 2, 3, 4 }, seen)
  end
  checks["examples/cqueues_server.lua"] = served
  checks["examples/luv_loop.lua"] = served
  local args = { ["examples/primes.lua"] = "200000", ["examples/primes_pool.lua"] = "200000" }
  checks["examples/primes.lua"] = function(out)
    -- 17984 primes below 200000
    assert.truthy(out:find("1 process:   17984 primes", 1, true), out)
    assert.truthy(out:match("%d+ processes: 17984 primes"), out)
    assert.truthy(out:find("speed-up:", 1, true))
  end

  local p = io.popen("ls examples/*.lua")
  for file in p:lines() do
    it(file .. " runs and exits 0", function()
      local out, code = run(file, args[file])
      assert.are.equal(0, code, out)
      if checks[file] then checks[file](out) end
    end)
  end
  p:close()

  it("leave no process behind", function()
    assert.are.same({}, H.children())
  end)
end)
