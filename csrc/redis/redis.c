/*
 * redis.c: multiprocessing.redis, a thin and binary-safe Redis client for
 * the cluster pool (lua/multiprocessing/cluster.lua), on hiredis (Debian:
 * libhiredis-dev; 0.14 has no TLS, so neither has this module).
 *
 * A C module of its own, not part of the core: only a program that uses
 * the cluster pool needs libhiredis (the core and a spawned child never
 * load it). It lives in its own directory so that the core's and the
 * embedding host's wildcard of the top-level C files never picks it up.
 *
 * What it does, and no more: connect to a Unix socket path or host:port
 * with a connect timeout and a command timeout; queue commands (any bytes
 * in any argument) and read their replies, with an optional wait bound;
 * convert a reply to Lua values; close. URL parsing, AUTH, SELECT and
 * reconnecting with back-off are Lua's (cluster/conn.lua): a broken
 * connection is closed here and reported as (nil, msg, "io").
 *
 * Replies: status and string -> string, integer -> integer, nil -> nil at
 * the top and false inside an array (so that arrays stay sequences), array
 * -> table with n, error -> nil, msg, "error". hiredis parses the
 * protocol; this file bounds what it converts (nesting depth, stack).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

#include "lua.h"
#include "lauxlib.h"

#define REDIS_T "multiprocessing.Redis"
#define EXPORT __attribute__((visibility("default")))
#define MAX_DEPTH 16      /* deeper replies than any command we use gives */
#define MAX_ARGS 1000000  /* arguments of one command */

typedef struct Redis {
  redisContext *c;        /* NULL: closed */
  int pending;            /* replies queued for and not read yet */
} Redis;

EXPORT int luaopen_multiprocessing_redis(lua_State *L);

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static struct timeval to_tv(double s) {
  struct timeval tv;
  tv.tv_sec = (time_t)s;
  tv.tv_usec = (suseconds_t)((s - (double)tv.tv_sec) * 1e6);
  return tv;
}

/* Free the context: close the fd and free memory; nothing is written to
   the socket, so a forked child that frees its inherited copy does not
   disturb its parent's connection. Never raises, never blocks. */
static void redis_free(Redis *r) {
  if (r->c) {
    redisFree(r->c);
    r->c = NULL;
  }
  r->pending = 0;
}

static Redis *check_redis(lua_State *L, int i) {
  Redis *r = (Redis *)luaL_checkudata(L, i, REDIS_T);
  if (!r->c) luaL_error(L, "Redis connection is closed");
  return r;
}

/* An I/O failure: the connection cannot be trusted any more (a reply may
   be half read), so it is closed. Returns nil, msg, "io". */
static int io_fail(lua_State *L, Redis *r, const char *what) {
  lua_pushnil(L);
  if (r->c && r->c->err) lua_pushfstring(L, "%s: %s", what, r->c->errstr);
  else lua_pushfstring(L, "%s: %s", what, strerror(errno));
  lua_pushliteral(L, "io");
  redis_free(r);
  return 3;
}

/* Push a reply element as a Lua value (nil inside arrays is false). */
static void push_reply(lua_State *L, const redisReply *rep, int depth) {
  size_t i;
  if (depth > MAX_DEPTH) luaL_error(L, "Redis reply nested too deep");
  switch (rep->type) {
  case REDIS_REPLY_STRING:
  case REDIS_REPLY_STATUS:
  case REDIS_REPLY_ERROR:
    lua_pushlstring(L, rep->str, rep->len);
    break;
  case REDIS_REPLY_INTEGER:
    lua_pushinteger(L, (lua_Integer)rep->integer);
    break;
  case REDIS_REPLY_ARRAY:
    luaL_checkstack(L, 3, "Redis reply");
    if (rep->elements > (size_t)MAX_ARGS) luaL_error(L, "Redis reply too long");
    lua_createtable(L, (int)rep->elements, 1);
    for (i = 0; i < rep->elements; i++) {
      push_reply(L, rep->element[i], depth + 1);
      lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    lua_pushinteger(L, (lua_Integer)rep->elements);
    lua_setfield(L, -2, "n");
    break;
  default:                               /* REDIS_REPLY_NIL */
    if (depth == 0) lua_pushnil(L);
    else lua_pushboolean(L, 0);
    break;
  }
}

/* Box a reply so that a raise while it is converted frees it. */
static int reply_box_gc(lua_State *L) {
  redisReply **box = (redisReply **)lua_touserdata(L, 1);
  if (*box) { freeReplyObject(*box); *box = NULL; }
  return 0;
}

/* Convert the reply (freed here) to the call's results. */
static int return_reply(lua_State *L, redisReply *rep) {
  redisReply **box = (redisReply **)lua_newuserdatauv(L, sizeof *box, 0);
  *box = rep;
  if (luaL_newmetatable(L, "multiprocessing.RedisReply")) {
    lua_pushcfunction(L, reply_box_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, reply_box_gc);
    lua_setfield(L, -2, "__close");
  }
  lua_setmetatable(L, -2);
  lua_toclose(L, -1);
  if (rep->type == REDIS_REPLY_ERROR) {
    lua_pushnil(L);
    lua_pushlstring(L, rep->str, rep->len);
    lua_pushliteral(L, "error");
    return 3;
  }
  push_reply(L, rep, 0);
  return 1;
}

/* redis.connect{path= | host=, port=, connect_timeout=, timeout=}
   -> Redis | nil, msg */
static int redis_connect(lua_State *L) {
  const char *path, *host;
  lua_Integer port;
  double cto, to;
  Redis *r;
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_getfield(L, 1, "path");
  path = luaL_optstring(L, -1, NULL);
  lua_getfield(L, 1, "host");
  host = luaL_optstring(L, -1, "127.0.0.1");
  lua_getfield(L, 1, "port");
  port = luaL_optinteger(L, -1, 6379);
  lua_getfield(L, 1, "connect_timeout");
  cto = luaL_optnumber(L, -1, 5);
  lua_getfield(L, 1, "timeout");
  to = luaL_optnumber(L, -1, 30);
  lua_pop(L, 3);
  luaL_argcheck(L, port > 0 && port < 65536, 1, "port must be 1 to 65535");
  luaL_argcheck(L, cto > 0 && cto < 1e6, 1, "connect_timeout must be > 0");
  luaL_argcheck(L, to >= 0 && to < 1e6, 1, "timeout must be >= 0");
  /* closed first, then the resource (nothing leaks if a raise comes) */
  r = (Redis *)lua_newuserdatauv(L, sizeof *r, 0);
  r->c = NULL;
  r->pending = 0;
  luaL_setmetatable(L, REDIS_T);
  if (path) r->c = redisConnectUnixWithTimeout(path, to_tv(cto));
  else r->c = redisConnectWithTimeout(host, (int)port, to_tv(cto));
  if (!r->c) {
    lua_pushnil(L);
    lua_pushliteral(L, "connect: out of memory");
    return 2;
  }
  if (r->c->err) {
    lua_pushnil(L);
    lua_pushfstring(L, "connect %s: %s", path ? path : host, r->c->errstr);
    redis_free(r);
    return 2;
  }
  /* blocking reads time out after the command timeout (SO_RCVTIMEO) */
  if (to > 0 && redisSetTimeout(r->c, to_tv(to)) != REDIS_OK) {
    lua_pushnil(L);
    lua_pushfstring(L, "connect: %s", r->c->errstr);
    redis_free(r);
    return 2;
  }
  if (!path) redisEnableKeepAlive(r->c);
  return 1;
}

/* Append the command whose words are at stack indices from..top. */
static void append(lua_State *L, Redis *r, int from) {
  int top = lua_gettop(L), argc = top - from + 1, i;
  const char **argv;
  size_t *lens;
  luaL_argcheck(L, argc >= 1, from, "command expected");
  luaL_argcheck(L, argc <= MAX_ARGS, from, "too many arguments");
  argv = (const char **)lua_newuserdatauv(L, sizeof *argv * (size_t)argc, 0);
  lens = (size_t *)lua_newuserdatauv(L, sizeof *lens * (size_t)argc, 0);
  for (i = 0; i < argc; i++) {
    int t = lua_type(L, from + i);
    luaL_argexpected(L, t == LUA_TSTRING || t == LUA_TNUMBER, from + i, "string or number");
    argv[i] = lua_tolstring(L, from + i, &lens[i]);   /* a number becomes its text in place */
  }
  if (redisAppendCommandArgv(r->c, argc, argv, lens) != REDIS_OK)
    luaL_error(L, "Redis: out of memory");
  r->pending++;
  lua_pop(L, 2);
}

/* r:append(word, ...) -> r: queue a command (any bytes), sent by the next
   recv */
static int redis_append(lua_State *L) {
  Redis *r = check_redis(L, 1);
  append(L, r, 2);
  lua_settop(L, 1);
  return 1;
}

/* Send what is queued. hiredis writes with write(2): a peer that closed
   would raise SIGPIPE and kill the program, so SIGPIPE is blocked while it
   writes and a SIGPIPE it caused is taken off the pending set (the error
   comes back as EPIPE). Returns 0, or -1 on an I/O error. */
static int write_all(Redis *r) {
  sigset_t pipe, old;
  int done = 0, rc = 0, was_pending;
  sigemptyset(&pipe);
  sigaddset(&pipe, SIGPIPE);
  {
    sigset_t pend;
    sigpending(&pend);
    was_pending = sigismember(&pend, SIGPIPE);
  }
  pthread_sigmask(SIG_BLOCK, &pipe, &old);
  while (!done && rc == 0)
    if (redisBufferWrite(r->c, &done) != REDIS_OK) rc = -1;
  if (!was_pending) {
    struct timespec zero = { 0, 0 };
    while (sigtimedwait(&pipe, NULL, &zero) == SIGPIPE) {}
  }
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  return rc;
}

/* Read one reply, waiting at most timeout seconds (< 0: the command
   timeout). Returns 1 with *rep set, 0 on timeout, -1 on an I/O error. */
static int read_reply(Redis *r, double timeout, redisReply **rep) {
  double deadline = timeout >= 0 ? now() + timeout : -1;
  void *out = NULL;
  if (write_all(r) != 0) return -1;
  for (;;) {
    struct pollfd pfd;
    int ms, n;
    if (redisGetReplyFromReader(r->c, &out) != REDIS_OK) return -1;
    if (out) { *rep = (redisReply *)out; return 1; }
    if (deadline < 0) {
      /* a blocking read, bounded by SO_RCVTIMEO (the command timeout) */
      if (redisBufferRead(r->c) != REDIS_OK) return -1;
      continue;
    }
    ms = (int)((deadline - now()) * 1000 + 0.999);
    if (ms < 0) ms = 0;
    pfd.fd = r->c->fd;
    pfd.events = POLLIN;
    pfd.revents = 0;
    n = poll(&pfd, 1, ms);
    if (n < 0 && errno != EINTR) return -1;
    if (n == 0 && now() >= deadline) return 0;
    if (n > 0 && redisBufferRead(r->c) != REDIS_OK) return -1;
  }
}

/* r:recv([timeout]) -> reply | nil, msg, "error" | nil, "timeout" |
   nil, msg, "io": send what is queued, then read the next reply */
static int redis_recv(lua_State *L) {
  Redis *r = check_redis(L, 1);
  double timeout = -1;
  redisReply *rep = NULL;
  int got;
  if (!lua_isnoneornil(L, 2)) {
    timeout = luaL_checknumber(L, 2);
    luaL_argcheck(L, timeout >= 0, 2, "timeout must be >= 0");
  }
  if (r->pending <= 0) luaL_error(L, "Redis recv: no reply is expected");
  got = read_reply(r, timeout, &rep);
  if (got < 0) return io_fail(L, r, "recv");
  if (got == 0) {
    lua_pushnil(L);
    lua_pushliteral(L, "timeout");
    return 2;
  }
  r->pending--;
  return return_reply(L, rep);
}

/* r:command(word, ...) -> reply | nil, msg, "error" | nil, msg, "io" */
static int redis_command(lua_State *L) {
  Redis *r = check_redis(L, 1);
  redisReply *rep = NULL;
  luaL_argcheck(L, r->pending == 0, 1, "replies are still pending");
  append(L, r, 2);
  if (read_reply(r, -1, &rep) < 0) return io_fail(L, r, "command");
  r->pending--;
  return return_reply(L, rep);
}

/* r:pending() -> number of replies queued and not read */
static int redis_pending(lua_State *L) {
  Redis *r = check_redis(L, 1);
  lua_pushinteger(L, r->pending);
  return 1;
}

/* r:fileno() -> fd */
static int redis_fileno(lua_State *L) {
  Redis *r = check_redis(L, 1);
  lua_pushinteger(L, r->c->fd);
  return 1;
}

/* r:close(): idempotent; also __gc and __close */
static int redis_close(lua_State *L) {
  Redis *r = (Redis *)luaL_checkudata(L, 1, REDIS_T);
  redis_free(r);
  return 0;
}

static int redis_tostring(lua_State *L) {
  Redis *r = (Redis *)luaL_checkudata(L, 1, REDIS_T);
  if (r->c) lua_pushfstring(L, "<Redis(fd %d)>", r->c->fd);
  else lua_pushliteral(L, "<Redis(closed)>");
  return 1;
}

/* r:closed() -> boolean */
static int redis_closed(lua_State *L) {
  Redis *r = (Redis *)luaL_checkudata(L, 1, REDIS_T);
  lua_pushboolean(L, r->c == NULL);
  return 1;
}

/* require "multiprocessing.redis" */
EXPORT int luaopen_multiprocessing_redis(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"append", redis_append},
    {"recv", redis_recv},
    {"command", redis_command},
    {"pending", redis_pending},
    {"fileno", redis_fileno},
    {"close", redis_close},
    {"closed", redis_closed},
    {NULL, NULL}
  };
  static const luaL_Reg meta[] = {
    {"__gc", redis_close},
    {"__close", redis_close},
    {"__tostring", redis_tostring},
    {NULL, NULL}
  };
  static const luaL_Reg funcs[] = {
    {"connect", redis_connect},
    {NULL, NULL}
  };
  luaL_newmetatable(L, REDIS_T);
  luaL_setfuncs(L, meta, 0);
  luaL_newlib(L, methods);
  lua_setfield(L, -2, "__index");         /* mt */
  lua_pop(L, 1);
  luaL_newlib(L, funcs);
  return 1;
}
