rockspec_format = "3.0"
package = "multiprocessing"
version = "scm-1"
source = {
  url = "git+https://example.invalid/multiprocessing.git",
}
description = {
  summary = "Python's multiprocessing for Lua 5.4: processes, pipes, queues, locks, shared memory and a supervised pool",
  detailed = [[
A C core implements processes (fork, spawn, forkserver), framed pipes with
fd passing, shared-memory queues, crash-safe locks, shared values and a
supervised worker pool; Lua modules give it the API Python users know.
]],
  license = "MIT",
}
dependencies = {
  "lua >= 5.4, < 5.5",
}
-- HMAC-SHA256 and random bytes come from OpenSSL's libcrypto (3.0 or later;
-- Debian: libssl-dev), in a module of their own (multiprocessing.auth), so
-- that only a process that runs an authkey handshake loads libcrypto.
external_dependencies = {
  OPENSSL = { header = "openssl/evp.h", library = "crypto" },
  -- the cluster pool's Redis client (multiprocessing.redis); Debian:
  -- libhiredis-dev (0.14: no TLS)
  HIREDIS = { header = "hiredis/hiredis.h", library = "hiredis" },
}
build = {
  type = "builtin",
  modules = {
    ["multiprocessing.check"] = "lua/multiprocessing/check.lua",
    ["multiprocessing.cluster"] = "lua/multiprocessing/cluster.lua",
    ["multiprocessing.cluster.conn"] = "lua/multiprocessing/cluster/conn.lua",
    ["multiprocessing.cluster.wire"] = "lua/multiprocessing/cluster/wire.lua",
    ["multiprocessing.cluster.worker"] = "lua/multiprocessing/cluster/worker.lua",
    ["multiprocessing.cluster.results"] = "lua/multiprocessing/cluster/results.lua",
    ["multiprocessing.codec"] = "lua/multiprocessing/codec.lua",
    ["multiprocessing.connection"] = "lua/multiprocessing/connection.lua",
    ["multiprocessing.context"] = "lua/multiprocessing/context.lua",
    ["multiprocessing.log"] = "lua/multiprocessing/log.lua",
    ["multiprocessing.errors"] = "lua/multiprocessing/errors.lua",
    ["multiprocessing.forkserver"] = "lua/multiprocessing/forkserver.lua",
    ["multiprocessing"] = "lua/multiprocessing/init.lua",
    ["multiprocessing.managers"] = "lua/multiprocessing/managers.lua",
    ["multiprocessing.managers.builtins"] = "lua/multiprocessing/managers/builtins.lua",
    ["multiprocessing.managers.client"] = "lua/multiprocessing/managers/client.lua",
    ["multiprocessing.managers.objects"] = "lua/multiprocessing/managers/objects.lua",
    ["multiprocessing.managers.proxies"] = "lua/multiprocessing/managers/proxies.lua",
    ["multiprocessing.managers.refs"] = "lua/multiprocessing/managers/refs.lua",
    ["multiprocessing.managers.server"] = "lua/multiprocessing/managers/server.lua",
    ["multiprocessing.managers.sync"] = "lua/multiprocessing/managers/sync.lua",
    ["multiprocessing.polling"] = "lua/multiprocessing/polling.lua",
    ["multiprocessing.pool"] = "lua/multiprocessing/pool.lua",
    ["multiprocessing.pool_jobs"] = "lua/multiprocessing/pool_jobs.lua",
    ["multiprocessing.pool_results"] = "lua/multiprocessing/pool_results.lua",
    ["multiprocessing.pool_scheduler"] = "lua/multiprocessing/pool_scheduler.lua",
    ["multiprocessing.pool_supervisor"] = "lua/multiprocessing/pool_supervisor.lua",
    ["multiprocessing.pool_worker"] = "lua/multiprocessing/pool_worker.lua",
    ["multiprocessing.process"] = "lua/multiprocessing/process.lua",
    ["multiprocessing.queues"] = "lua/multiprocessing/queues.lua",
    ["multiprocessing.sharedctypes"] = "lua/multiprocessing/sharedctypes.lua",
    ["multiprocessing.spawn"] = "lua/multiprocessing/spawn.lua",
    ["multiprocessing.synchronize"] = "lua/multiprocessing/synchronize.lua",
    ["multiprocessing.core"] = {
      sources = {
        "csrc/core.c",
        "csrc/ground.c",
        "csrc/lock.c",
        "csrc/codec.c",
        "csrc/codec_enc.c",
        "csrc/codec_dec.c",
        "csrc/codec_scalar.c",
        "csrc/wire.c",
        "csrc/conn.c",
        "csrc/listener.c",
        "csrc/fdpass.c",
        "csrc/osutil.c",
        "csrc/embed.c",
        "csrc/pool.c",
        "csrc/pool_fds.c",
        "csrc/pool_worker.c",
        "csrc/process.c",
        "csrc/queue.c",
        "csrc/queue_chan.c",
        "csrc/queue_feeder.c",
        "csrc/queue_ring.c",
        "csrc/queue_wait.c",
        "csrc/sharedctypes.c",
        "csrc/shm.c",
        "csrc/sync.c",
        "csrc/sync_cond.c",
      },
      incdirs = { "csrc" },
      libraries = { "m" },
    },
    ["multiprocessing.auth"] = {
      sources = { "csrc/auth.c" },
      incdirs = { "csrc", "$(OPENSSL_INCDIR)" },
      libdirs = { "$(OPENSSL_LIBDIR)" },
      libraries = { "crypto" },
    },
    ["multiprocessing.redis"] = {
      sources = { "csrc/redis/redis.c" },
      incdirs = { "$(HIREDIS_INCDIR)" },
      libdirs = { "$(HIREDIS_LIBDIR)" },
      libraries = { "hiredis" },
    },
  },
  install = {
    bin = { ["mp-worker"] = "bin/mp-worker" },
  },
}
