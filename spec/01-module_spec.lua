-- The module as a whole: Lua version, no globals, error objects.
describe("the module", function()
  it("runs under Lua 5.4", function()
    assert.are.equal("Lua 5.4", _VERSION)
  end)

  it("creates no global when required", function()
    local before = {}
    for k in pairs(_G) do before[k] = true end
    for k in pairs(package.loaded) do
      if k:match("^multiprocessing") then package.loaded[k] = nil end
    end
    require "multiprocessing"
    for k in pairs(_G) do
      assert.is_true(before[k] ~= nil, "new global: " .. tostring(k))
    end
  end)

  it("reaches every module's exports, the lazily loaded ones included", function()
    local mp = require "multiprocessing"
    local names = {}
    for _, m in ipairs(mp._modules) do names[#names + 1] = m end
    local lazy_modules = {}
    for name, m in pairs(mp._lazy) do lazy_modules[m] = true; names[#names + 1] = m; assert(name) end
    for _, m in ipairs(names) do
      local mod = require("multiprocessing." .. m)
      for k, v in pairs(mod.exports or mod) do
        if k:sub(1, 1) ~= "_" and k ~= "exports" then
          assert.are.equal(v, mp[k], m .. "." .. k)
          if lazy_modules[m] then
            assert.are.equal(m, mp._lazy[k], k .. " must be listed in init.lua's lazy table")
          end
        end
      end
    end
  end)

  it("exports the foundation API", function()
    local mp = require "multiprocessing"
    for _, name in ipairs{ "Process", "Pipe", "wait", "current_process",
      "parent_process", "active_children", "cpu_count", "is_main",
      "TimeoutError", "ProcessError", "RemoteError", "WorkerLostError",
      "SerializationError", "AuthenticationError" } do
      assert.is_not_nil(mp[name], name)
    end
  end)
end)

describe("error objects", function()
  local mp = require "multiprocessing"
  local errors = require "multiprocessing.errors"

  it("carry type and message, and print both", function()
    local e = mp.TimeoutError("took too long")
    assert.are.equal("TimeoutError", e.type)
    assert.are.equal("took too long", e.message)
    assert.are.equal("TimeoutError: took too long", tostring(e))
  end)

  it("test their class and superclass with is", function()
    local e = errors.new("TimeoutError", "x")
    assert.is_true(mp.TimeoutError:is(e))
    assert.is_true(mp.ProcessError:is(e))
    assert.is_false(mp.RemoteError:is(e))
    assert.is_false(mp.TimeoutError:is("TimeoutError: x"))
    assert.is_false(mp.TimeoutError:is(nil))
  end)

  it("print a remote traceback and pid", function()
    local e = errors.from_data{ type = "RemoteError", message = "boom",
                                traceback = "stack traceback:\n\tx.lua:1", pid = 42 }
    assert.is_true(mp.RemoteError:is(e))
    local s = tostring(e)
    assert.truthy(s:find("RemoteError: boom", 1, true))
    assert.truthy(s:find("42", 1, true))
    assert.truthy(s:find("x.lua:1", 1, true))
  end)

  it("are rebuilt from data of an unknown type", function()
    local e = errors.from_data{ type = "KeyError", message = "k" }
    assert.are.equal("KeyError", e.type)
    assert.is_true(errors.is_error(e))
  end)

  it("round-trip through to_data, strings included", function()
    local d = errors.to_data("plain", 7, "tb")
    assert.are.same({ type = "Error", message = "plain", traceback = "tb", pid = 7 }, d)
    local e = errors.from_data(errors.to_data(mp.TimeoutError("t"), 9))
    assert.is_true(mp.TimeoutError:is(e))
    assert.are.equal(9, e.pid)
  end)
end)
