-- require "multiprocessing": the public API.
--
-- Each concept lives in its own module (process, connection, queues,
-- synchronize, sharedctypes, pool, context, ...), which returns a table of
-- public names; this module gathers them into one table. A name exported
-- twice is a bug and raises. The pool module, the largest, is loaded on the
-- first use of its names, so that a program (or a spawned child) that
-- needs no Pool does not pay for it.

local require, pairs, error, ipairs, rawget, setmetatable =
      require, pairs, error, ipairs, rawget, setmetatable
local sub = string.sub

local M = {}

local modules = {
  "errors", "codec", "process", "connection", "synchronize", "sharedctypes",
  "queues", "context", "log",
}
-- name -> module, for the modules loaded on first use
local lazy = { Pool = "pool", as_completed = "pool", Manager = "managers",
               SyncManager = "managers", BaseManager = "managers" }
M._lazy = lazy
M._modules = modules

local function merge(name)
  local mod = require("multiprocessing." .. name)
  local exports = mod.exports or mod
  for k, v in pairs(exports) do
    if sub(k, 1, 1) ~= "_" and k ~= "exports" then
      local old = rawget(M, k)
      if old ~= nil and old ~= v then
        error("multiprocessing: '" .. k .. "' exported by two modules", 0)
      end
      M[k] = v
    end
  end
end

for _, name in ipairs(modules) do merge(name) end

-- The managers' handle kinds: a process that receives a proxy or a
-- manager before it used the managers loads them then (their modules
-- register the real rebuilds, replacing these).
local core = require "multiprocessing.core"
local MANAGER_KINDS = { Manager = "multiprocessing.managers",
                        ManagerProxy = "multiprocessing.managers.proxies" }
for kind, modname in pairs(MANAGER_KINDS) do
  core.register_handle(kind, function(state)
    merge("managers")
    return require(modname)._rebuild(state)
  end)
end

setmetatable(M, { __index = function(_, k)
  local name = lazy[k]
  if name then
    merge(name)
    return rawget(M, k)
  end
end })

M._VERSION = "multiprocessing scm"
return M
