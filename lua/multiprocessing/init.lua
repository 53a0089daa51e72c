-- require "multiprocessing": the public API.
--
-- Each concept lives in its own module (process, connection, queues,
-- synchronize, sharedctypes, pool, context, ...), which returns a table of
-- public names; this module gathers them into one table. A name exported
-- twice is a bug and raises here, at load time.

local require, pairs, error, ipairs = require, pairs, error, ipairs
local searchpath, sub = package.searchpath, string.sub

local M = {}

local modules = {
  "errors", "codec", "process", "connection", "synchronize", "sharedctypes",
  "queues", "pool", "context",
}

for _, name in ipairs(modules) do
  local full = "multiprocessing." .. name
  if searchpath(full, package.path) then
    local mod = require(full)
    local exports = mod.exports or mod
    for k, v in pairs(exports) do
      if sub(k, 1, 1) ~= "_" and k ~= "exports" then
        if M[k] ~= nil and M[k] ~= v then
          error("multiprocessing: '" .. k .. "' exported by two modules", 0)
        end
        M[k] = v
      end
    end
  end
end

M._VERSION = "multiprocessing scm"
return M
