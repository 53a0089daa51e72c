/*
 * listener.c: the sockets that make Connections between processes that
 * did not start each other: a Listener bound to a Unix socket path or a
 * TCP host:port (core.listen, l:_accept), and the client's core.connect.
 * Both give Connections (conn.c) that are untrusted until connection.lua's
 * authkey challenge passes (docs/design.md, decision 3). TCP sockets get
 * TCP_NODELAY and cannot carry handles.
 *
 * A Listener records the pid that bound it: only that process unlinks its
 * socket path (docs/design.md, decision 4). A wait for a connection, or a connect, that a
 * signal interrupts lets the signal's Lua hook run (mp_interrupted).
 */
#include "mp.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

typedef struct mp_listener {
  int fd;              /* -1 when closed */
  int owner;           /* pid that bound it: only it unlinks the path */
  int unixsock;
  char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
} mp_listener;

static mp_listener *to_listener(lua_State *L, int i) {
  return (mp_listener *)luaL_checkudata(L, i, MP_LISTENER_T);
}

static mp_listener *check_listener(lua_State *L, int i) {
  mp_listener *l = to_listener(L, i);
  if (l->fd < 0) luaL_error(L, "listener is closed");
  return l;
}

static void listener_release(mp_listener *l) {
  if (l->fd < 0) return;
  close(l->fd);
  l->fd = -1;
  if (l->unixsock && l->path[0] && l->owner == mp_getpid()) unlink(l->path);
}

static int unix_addr(lua_State *L, const char *path, struct sockaddr_un *sa) {
  size_t n = strlen(path);
  memset(sa, 0, sizeof *sa);
  sa->sun_family = AF_UNIX;
  if (n == 0 || n >= sizeof sa->sun_path)
    return luaL_error(L, "bad Unix socket path '%s' (1 to %d bytes)", path,
                      (int)sizeof sa->sun_path - 1);
  memcpy(sa->sun_path, path, n);
  return (int)(offsetof(struct sockaddr_un, sun_path) + n + 1);
}

/* The port at index i: getaddrinfo takes a number past 65535 and uses it
   modulo 65536, so a numeric port out of range raises here. */
static const char *check_port(lua_State *L, int i) {
  const char *port = luaL_checkstring(L, i), *p;
  unsigned long v = 0;
  for (p = port; *p >= '0' && *p <= '9'; p++)
    if (v <= 65535) v = v * 10 + (unsigned long)(*p - '0');
  if (*p == '\0' && p != port && v > 65535)
    luaL_argerror(L, i, lua_pushfstring(L, "port %s out of range 0..65535", port));
  return port;
}

/* Resolve host:port; pushes nothing. Raises with gai_strerror. */
static struct addrinfo *resolve(lua_State *L, const char *host, const char *port,
                                int passive) {
  struct addrinfo hints, *res = NULL;
  int r;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  r = getaddrinfo(*host ? host : NULL, port, &hints, &res);
  if (r != 0) luaL_error(L, "cannot resolve '%s:%s': %s", host, port, gai_strerror(r));
  return res;
}

/* core.listen(path) or core.listen(host, port, backlog) -> Listener */
static int core_listen(lua_State *L) {
  mp_listener *l;
  int backlog = (int)luaL_optinteger(L, 3, 128), fd = -1, e = 0;
  const char *host = luaL_checkstring(L, 1);
  int is_unix = lua_isnoneornil(L, 2);
  l = (mp_listener *)lua_newuserdatauv(L, sizeof(mp_listener), 0);
  memset(l, 0, sizeof *l);
  l->fd = -1;
  luaL_setmetatable(L, MP_LISTENER_T);
  if (is_unix) {
    struct sockaddr_un sa;
    int len = unix_addr(L, host, &sa);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return mp_raise_errno(L, errno, "socket");
    if (bind(fd, (struct sockaddr *)&sa, (socklen_t)len) != 0 || listen(fd, backlog) != 0) {
      e = errno;
      close(fd);
      return mp_raise_errno(L, e, "cannot listen on '%s'", host);
    }
    memcpy(l->path, sa.sun_path, sizeof l->path);
    l->unixsock = 1;
  } else {
    const char *port = check_port(L, 2);
    struct addrinfo *res = resolve(L, host, port, 1), *ai;
    for (ai = res; ai; ai = ai->ai_next) {
      int one = 1;
      fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
      if (fd < 0) { e = errno; continue; }
      setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
      if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, backlog) == 0) break;
      e = errno;
      close(fd);
      fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0)
      return mp_raise_errno(L, e, "cannot listen on '%s:%s'", host, port);
  }
  l->fd = fd;
  l->owner = mp_getpid();
  return 1;
}

/* l:_address() -> path | host, port (the port chosen when 0 was asked) */
static int listener__address(lua_State *L) {
  mp_listener *l = check_listener(L, 1);
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  char host[NI_MAXHOST], port[NI_MAXSERV];
  if (l->unixsock) {
    lua_pushstring(L, l->path);
    return 1;
  }
  if (getsockname(l->fd, (struct sockaddr *)&ss, &len) != 0 ||
      getnameinfo((struct sockaddr *)&ss, len, host, sizeof host, port, sizeof port,
                  NI_NUMERICHOST | NI_NUMERICSERV) != 0)
    return mp_raise_errno(L, errno, "getsockname");
  lua_pushstring(L, host);
  lua_pushstring(L, port);
  return 2;
}

static void tune(int fd, int unixsock) {
  int one = 1;
  if (!unixsock) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* l:_accept([timeout]) -> Connection (untrusted) | nil, "timeout"; a
   signal's hook may raise from the wait (mp_interrupted) */
static int listener__accept(lua_State *L) {
  mp_listener *l = check_listener(L, 1);
  double deadline = mp_deadline(mp_opttimeout(L, 2));
  struct pollfd pfd;
  mp_conn *c;
  int fd, r;
  pfd.fd = l->fd;
  pfd.events = POLLIN;
  for (;;) {
    r = poll(&pfd, 1, mp_remaining_ms(deadline));
    if (r >= 0 || errno != EINTR) break;
    if (mp_interrupted(L)) return lua_error(L);
  }
  if (r < 0) return luaL_fileresult(L, 0, "poll");
  if (r == 0) return mp_reason(L, "timeout");
  c = mp_conn_push(L);
  for (;;) {
    fd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
    if (fd >= 0 || errno != EINTR) break;
    if (mp_interrupted(L)) return lua_error(L);
  }
  if (fd < 0) return luaL_fileresult(L, 0, "accept");
  tune(fd, l->unixsock);
  mp_conn_setfd(L, c, fd, 1, 1, l->unixsock, 0);
  return 1;
}

/* connect() fd to sa. A connect that a signal interrupts goes on in the
   background: wait for it (poll for writing), letting the signal's hook
   run (mp_interrupted) after each interruption. 0, an errno, or MP_RAISED. */
static int connect_fd(lua_State *L, int fd, const struct sockaddr *sa,
                      socklen_t len) {
  struct pollfd pfd;
  int err = 0, r;
  socklen_t elen = sizeof err;
  if (connect(fd, sa, len) == 0) return 0;
  if (errno != EINTR) return errno;
  pfd.fd = fd;
  pfd.events = POLLOUT;
  for (;;) {
    if (mp_interrupted(L)) return MP_RAISED;
    r = poll(&pfd, 1, -1);
    if (r > 0) break;
    if (r < 0 && errno != EINTR) return errno;
  }
  if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) != 0) return errno;
  return err;
}

/* core.connect(path) or core.connect(host, port) -> Connection (untrusted) */
static int core_connect(lua_State *L) {
  const char *host = luaL_checkstring(L, 1);
  int is_unix = lua_isnoneornil(L, 2), fd = -1, e = 0;
  mp_conn *c = mp_conn_push(L);
  if (is_unix) {
    struct sockaddr_un sa;
    int len = unix_addr(L, host, &sa);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return mp_raise_errno(L, errno, "socket");
    e = connect_fd(L, fd, (struct sockaddr *)&sa, (socklen_t)len);
    if (e != 0) {
      close(fd);
      if (e == MP_RAISED) return lua_error(L);
      return mp_raise_errno(L, e, "cannot connect to '%s'", host);
    }
  } else {
    const char *port = check_port(L, 2);
    struct addrinfo *res = resolve(L, host, port, 0), *ai;
    for (ai = res; ai; ai = ai->ai_next) {
      fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
      if (fd < 0) { e = errno; continue; }
      e = connect_fd(L, fd, ai->ai_addr, ai->ai_addrlen);
      if (e == 0) break;
      close(fd);
      fd = -1;
      if (e == MP_RAISED) break;
    }
    freeaddrinfo(res);
    if (e == MP_RAISED) return lua_error(L);
    if (fd < 0)
      return mp_raise_errno(L, e, "cannot connect to '%s:%s'", host, port);
  }
  tune(fd, is_unix);
  mp_conn_setfd(L, c, fd, 1, 1, is_unix, 0);
  return 1;
}

static int listener_close(lua_State *L) {
  listener_release(to_listener(L, 1));
  return 0;
}

static int listener_fileno(lua_State *L) {
  lua_pushinteger(L, check_listener(L, 1)->fd);
  return 1;
}

static int listener__closed(lua_State *L) {
  lua_pushboolean(L, to_listener(L, 1)->fd < 0);
  return 1;
}

static const luaL_Reg listener_methods[] = {
  {"_accept", listener__accept},
  {"_address", listener__address},
  {"_closed", listener__closed},
  {"close", listener_close},
  {"fileno", listener_fileno},
  {NULL, NULL}
};

MP_API void mp_listener_open(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"listen", core_listen},
    {"connect", core_connect},
    {NULL, NULL}
  };
  static const luaL_Reg listener_meta[] = {
    {"__gc", listener_close}, {"__close", listener_close}, {NULL, NULL}
  };
  /* connection.lua adds accept to the methods and fields to the metatable */
  mp_newclass(L, MP_LISTENER_T, (const luaL_Reg *const[]){ listener_methods, NULL },
              listener_meta, NULL, "Listener_methods");
  lua_setfield(L, -2, "Listener_mt");
  luaL_setfuncs(L, funcs, 0);
}
