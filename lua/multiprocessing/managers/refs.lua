-- multiprocessing.managers.refs: the reference counting of a manager's
-- server (docs/managers.md, "Object lifetime").
--
-- Each object counts its references (o.refs): those of each connection
-- (cl.refs[oid], given back by a request's rel list or when the connection
-- drops), transit ones (o.transit: a proxy on its way, taken by its sender
-- and adopted by its receiver) and those of proxies that live in this
-- server (stored in a dict, a queue...: proxies.lua marks them st.inner,
-- their __gc queues the id in srv.freeq, which the loop empties). An
-- object whose count falls to 0 leaves srv.objects; Lua's GC does the rest.
--
-- The server (server.lua) installs `methods` (what proxies.lua calls) and
-- calls the functions; builtins.lua's create, transit and adopt use them.

local collectgarbage, type = collectgarbage, type

local M = {}
local methods = {}
M.methods = methods

-- unref(srv, oid, n): oid loses n references; at 0 it leaves the server
local function unref(self, oid, n)
  local o = self.objects[oid]
  if not o then return end
  o.refs = o.refs - n
  if o.refs <= 0 then
    self.objects[oid] = nil
    local v = o.served
    if v ~= nil and self.ids[v] == o then self.ids[v] = nil end
  end
end
M.unref = unref

-- cl_ref(cl, o): a reference to o for connection cl
local function cl_ref(cl, o)
  o.refs = o.refs + 1
  cl.refs[o.id] = (cl.refs[o.id] or 0) + 1
end
M.cl_ref = cl_ref

-- cl_unref(srv, cl, oid): connection cl gives back one of its references
local function cl_unref(self, cl, oid)
  local n = cl.refs[oid]
  if not n then return end                -- not this connection's: ignored
  cl.refs[oid] = n > 1 and n - 1 or nil
  unref(self, oid, 1)
end

-- transit(o): a reference for a proxy on its way to a receiver
local function transit(o)
  o.refs = o.refs + 1
  o.transit = o.transit + 1
end
M.transit = transit

-- adopt(o [, cl]): a proxy arrived holds a reference, a transit one if o
-- has any, else a new one; cl's (a connection's) when cl is given
local function adopt(o, cl)
  if o.transit > 0 then o.transit = o.transit - 1
  else o.refs = o.refs + 1 end
  if cl then cl.refs[o.id] = (cl.refs[o.id] or 0) + 1 end
end
M.adopt = adopt

-- srv:ref_out(oid) -> "c" | "t" | nil: a proxy of this server being
-- serialized (proxies.lua): a reference for the client the answer being
-- encoded goes to, or else a transit one; nil if the object is gone
function methods:ref_out(oid)
  local o = self.objects[oid]
  if not o then return nil end
  local cl = self.enc_cl
  if cl then
    cl_ref(cl, o)
    local log = self.enc_log
    if not log then
      log = {}
      self.enc_log = log
    end
    log[#log + 1] = oid
    return "c"
  end
  transit(o)
  return "t"
end

-- srv:ref_in(oid, transit) -> true if the object exists: a proxy of this
-- server rebuilt here holds a reference (adopting a transit one)
function methods:ref_in(oid, in_transit)
  local o = self.objects[oid]
  if not o then return false end
  if in_transit then adopt(o) else o.refs = o.refs + 1 end
  return true
end

-- srv:unref_later(oid): an inner proxy's __gc (no work in a finalizer)
function methods:unref_later(oid)
  local q = self.freeq
  q[#q + 1] = oid
end

-- run_freeq(srv): the references of the inner proxies collected since
local function run_freeq(self)
  local q = self.freeq
  self.freeq = {}
  for i = 1, #q do unref(self, q[i], 1) end
end
M.run_freeq = run_freeq

-- srv:collect(): a full collection, until no inner proxy is left to free
-- (a freed container's proxies are found by the next one)
function methods:collect()
  for _ = 1, 32 do
    collectgarbage("collect")
    if self.freeq[1] == nil then return end
    run_freeq(self)
  end
end

-- refs_msg(srv, cl, oid, inc, rel): a request's reference traffic: inc
-- (the proxy making the call takes a reference for this connection), rel
-- (ids whose references it gives back)
function M.refs_msg(self, cl, oid, inc, rel)
  if inc then
    local o = self.objects[oid]
    if o then cl_ref(cl, o) end
  end
  if type(rel) == "table" then
    for i = 1, #rel do cl_unref(self, cl, rel[i]) end
  end
end

-- undo_refs(srv): the references an answer that could not be sent gave
-- its client (ref_out's log)
function M.undo_refs(self)
  local cl, log = self.enc_cl, self.enc_log
  self.enc_log = nil
  if log then
    for i = 1, #log do cl_unref(self, cl, log[i]) end
  end
end

return M
