-- Installation: make install PREFIX=..., and luarocks make without a
-- network, each giving a module that works outside the source tree.
local H = require "helpers"

local function sh(cmd)
  local p = io.popen(cmd .. " 2>&1; echo \"exit:$?\"")
  local out = p:read("a")
  p:close()
  return out:gsub("exit:%d+\n?$", ""), tonumber(out:match("exit:(%d+)\n?$"))
end

local function listed(rockspec_text, pattern)
  local t = {}
  for s in rockspec_text:gmatch(pattern) do t[s] = true end
  return t
end

-- A program that uses the installed module across a process.
local probe = [[
  local mp = require "multiprocessing"
  assert(package.searchpath("multiprocessing.core", package.cpath):find(os.getenv("WHERE"), 1, true))
  assert(package.searchpath("multiprocessing.auth", package.cpath):find(os.getenv("WHERE"), 1, true))
  assert(#require("multiprocessing.auth").hmac_sha256("k", "m") == 32)
  local a, b = mp.Pipe()
  local p = mp.Process{ target = function(c) c:send({ answer = 42 }) end, args = { b } }
  p:start()
  io.write(a:recv(5).answer, " ", p:join(5), "\n")
]]

local function run_probe(path, cpath, where)
  local script = H.tmpname("probe.lua")
  local f = io.open(script, "w"); f:write(probe); f:close()
  local out, code = sh(("cd /tmp && env WHERE=%q LUA_PATH=%q LUA_CPATH=%q lua5.4 %s")
                       :format(where, path, cpath, script))
  os.remove(script)
  return out, code
end

describe("installation", function()
  it("lists every module and C file in the rockspec", function()
    local f = assert(io.open("rockspec/multiprocessing-scm-1.rockspec"))
    local text = f:read("a")
    f:close()
    local lua_files = listed(text, '"(lua/multiprocessing/[%w_]+%.lua)"')
    local c_files = listed(text, '"(csrc/[%w_]+%.c)"')
    local p = io.popen("ls lua/multiprocessing/*.lua csrc/*.c")
    for file in p:lines() do
      if file:match("%.lua$") then
        assert.is_true(lua_files[file] ~= nil, file .. " is missing from the rockspec")
      else
        assert.is_true(c_files[file] ~= nil, file .. " is missing from the rockspec")
      end
    end
    p:close()
  end)

  it("works after make install PREFIX=...", function()
    local prefix = H.tmpname("prefix")
    local out, code = sh(("make -s install PREFIX=%s"):format(prefix))
    assert.are.equal(0, code, out)
    out, code = run_probe(prefix .. "/share/lua/5.4/?.lua;" .. prefix .. "/share/lua/5.4/?/init.lua",
                          prefix .. "/lib/lua/5.4/?.so", prefix)
    sh("rm -rf " .. prefix)
    assert.are.equal(0, code, out)
    assert.are.equal("42 0\n", out)
  end)

  it("installs with luarocks make, without a network", function()
    if not sh("command -v luarocks"):find("luarocks", 1, true) then
      pending("luarocks is not installed")
      return
    end
    local dir, tree = H.tmpname("src"), H.tmpname("tree")
    local out, code = sh(("mkdir -p %s && cp -r lua csrc bin rockspec %s/ && cd %s && " ..
      "luarocks --lua-version 5.4 make --tree %s rockspec/multiprocessing-scm-1.rockspec")
      :format(dir, dir, dir, tree))
    assert.are.equal(0, code, out)
    out, code = run_probe(tree .. "/share/lua/5.4/?.lua;" .. tree .. "/share/lua/5.4/?/init.lua",
                          tree .. "/lib/lua/5.4/?.so", tree)
    sh("rm -rf " .. dir .. " " .. tree)
    assert.are.equal(0, code, out)
    assert.are.equal("42 0\n", out)
  end)
end)
