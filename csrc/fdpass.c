/*
 * fdpass.c: file descriptors as values, and passing them between
 * processes (docs/design.md, decisions 1, 5 and 8): FdBox (MP_FDBOX_T),
 * a handle owning one fd, which the codec sends with SCM_RIGHTS; the
 * socketpairs and pipes the spawn and forkserver machinery is made of
 * (spawn.lua), given as boxes so that a raise leaks nothing; one byte
 * carrying one fd (core._send_fd, _recv_fd: how the fork server hands a
 * request to the child it forked ahead); and the forkserver's status
 * pipe, on which it writes a child's 4-byte exit code.
 *
 * process.c takes fds out of boxes (mp_fdbox_fd, mp_fdbox_take); the
 * sends and receives are wire.c's.
 */
#include "mp.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MP_FDBOX_T "multiprocessing.FdBox"

typedef struct fdbox { int fd; } fdbox;

static fdbox *to_fdbox(lua_State *L, int i) {
  return (fdbox *)luaL_checkudata(L, i, MP_FDBOX_T);
}

static fdbox *check_fdbox(lua_State *L, int i) {
  fdbox *b = to_fdbox(L, i);
  if (b->fd < 0) luaL_error(L, "fd box is closed");
  return b;
}

MP_API int mp_fdbox_fd(lua_State *L, int i) {
  return check_fdbox(L, i)->fd;
}

MP_API int mp_fdbox_take(lua_State *L, int i) {
  fdbox *b = check_fdbox(L, i);
  int fd = b->fd;
  b->fd = -1;
  return fd;
}

/* Push a closed box; the caller stores its fd once it has one. */
static fdbox *push_fdbox(lua_State *L) {
  fdbox *b = (fdbox *)lua_newuserdatauv(L, sizeof(fdbox), 0);
  b->fd = -1;
  luaL_setmetatable(L, MP_FDBOX_T);
  return b;
}

/* core._fdbox(fd) -> FdBox owning fd */
static int fdbox_new(lua_State *L) {
  int fd = (int)luaL_checkinteger(L, 1);
  luaL_argcheck(L, fd >= 0, 1, "bad file descriptor");
  push_fdbox(L)->fd = fd;
  return 1;
}

/* rebuild(state, fd) of an FdBox handle (the fork server's replies) */
static int fdbox_rebuild(lua_State *L) {
  lua_remove(L, 1);
  return fdbox_new(L);
}

/* box:fileno() -> fd */
static int fdbox_fileno(lua_State *L) {
  lua_pushinteger(L, check_fdbox(L, 1)->fd);
  return 1;
}

/* box:_detach() -> fd, now the caller's to close */
static int fdbox_detach(lua_State *L) {
  fdbox *b = check_fdbox(L, 1);
  lua_pushinteger(L, b->fd);
  b->fd = -1;
  return 1;
}

static int fdbox_close(lua_State *L) {
  fdbox *b = to_fdbox(L, 1);
  if (b->fd >= 0) close(b->fd);
  b->fd = -1;
  return 0;
}

/* __mp_reduce(box) -> "FdBox", {}, fd */
static int fdbox__reduce(lua_State *L) {
  fdbox *b = check_fdbox(L, 1);
  lua_pushliteral(L, "FdBox");
  lua_newtable(L);
  lua_pushinteger(L, b->fd);
  return 3;
}

static int fdbox__tostring(lua_State *L) {
  fdbox *b = to_fdbox(L, 1);
  if (b->fd < 0) lua_pushliteral(L, "<FdBox(closed)>");
  else lua_pushfstring(L, "<FdBox(%d)>", b->fd);
  return 1;
}

/* core._socketpair() -> box, box (Unix stream sockets, close-on-exec) */
static int core__socketpair(lua_State *L) {
  int sv[2];
  fdbox *a = push_fdbox(L), *b = push_fdbox(L);
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
    return mp_raise_errno(L, errno, "socketpair");
  a->fd = sv[0];
  b->fd = sv[1];
  return 2;
}

/* core._send_fd(sockbox, box) -> true | nil, msg: one byte on the unix
   socket carrying box's fd; the fork server hands a request to its child
   forked ahead this way */
static int core__send_fd(lua_State *L) {
  int sock = check_fdbox(L, 1)->fd, e;
  char one = 1;
  struct iovec iov;
  mp_fdlist fds;
  fds.n = 1;
  fds.fd[0] = check_fdbox(L, 2)->fd;
  iov.iov_base = &one;
  iov.iov_len = 1;
  e = mp_sendall(sock, &iov, 1, &fds);
  if (e != 0) {
    errno = e;
    return luaL_fileresult(L, 0, "sendmsg");
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* core._recv_fd(sockbox) -> box | nil: the fd one byte carried (see
   _send_fd), waiting for it; nil at the end of the stream */
static int core__recv_fd(lua_State *L) {
  int sock = check_fdbox(L, 1)->fd;
  char one;
  mp_fdlist fds;
  ssize_t n;
  fdbox *b = push_fdbox(L);
  fds.n = 0;
  for (;;) {
    n = mp_recv_fds(sock, &one, 1, 0, &fds, NULL);
    if (n >= 0 || errno != EINTR) break;
    if (mp_interrupted(L)) return lua_error(L);   /* nothing came */
  }
  if (n < 0) return luaL_fileresult(L, 0, "recvmsg");
  if (n == 0 || fds.n != 1) {
    mp_fdlist_close(&fds);
    lua_pushnil(L);
    return 1;
  }
  b->fd = fds.fd[0];
  return 1;
}

/* core._pipe() -> rbox, wbox (close-on-exec) */
static int core__pipe(lua_State *L) {
  int fds[2];
  fdbox *r = push_fdbox(L), *w = push_fdbox(L);
  if (pipe2(fds, O_CLOEXEC) != 0)
    return mp_raise_errno(L, errno, "pipe");
  r->fd = fds[0];
  w->fd = fds[1];
  return 2;
}

/* core._dup(fd) -> box holding a close-on-exec copy */
static int core__dup(lua_State *L) {
  int fd = (int)luaL_checkinteger(L, 1);
  fdbox *b = push_fdbox(L);
  b->fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
  if (b->fd < 0) return mp_raise_errno(L, errno, "dup");
  return 1;
}

/* Write an exit code on a status pipe whose reader may be gone: EPIPE,
   never SIGPIPE (which would kill the fork server), whatever the process
   does with SIGPIPE. */
static int write_code(int fd, int32_t code) {
  sigset_t sigpipe, old;
  ssize_t r;
  sigemptyset(&sigpipe);
  sigaddset(&sigpipe, SIGPIPE);
  sigprocmask(SIG_BLOCK, &sigpipe, &old);
  do r = write(fd, &code, sizeof code);
  while (r < 0 && errno == EINTR);
  if (r < 0 && errno == EPIPE && !sigismember(&old, SIGPIPE)) {
    struct timespec zero = {0, 0};
    int e = errno;
    while (sigtimedwait(&sigpipe, NULL, &zero) < 0 && errno == EINTR) {}
    errno = e;
  }
  sigprocmask(SIG_SETMASK, &old, NULL);
  return r == (ssize_t)sizeof code;
}

/* core._status_write(wbox, code): the forkserver tells an exit code */
static int core__status_write(lua_State *L) {
  fdbox *b = check_fdbox(L, 1);
  lua_pushboolean(L, write_code(b->fd, (int32_t)luaL_checkinteger(L, 2)));
  return 1;
}

MP_API void mp_fdpass_open(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"_fdbox", fdbox_new},
    {"_socketpair", core__socketpair},
    {"_pipe", core__pipe},
    {"_dup", core__dup},
    {"_send_fd", core__send_fd},
    {"_recv_fd", core__recv_fd},
    {"_status_write", core__status_write},
    {NULL, NULL}
  };
  static const luaL_Reg fdbox_methods[] = {
    {"fileno", fdbox_fileno},
    {"close", fdbox_close},
    {"_detach", fdbox_detach},
    {NULL, NULL}
  };
  static const luaL_Reg fdbox_meta[] = {
    {"__gc", fdbox_close}, {"__close", fdbox_close}, {"__mp_reduce", fdbox__reduce},
    {"__tostring", fdbox__tostring}, {NULL, NULL}
  };
  mp_newclass(L, MP_FDBOX_T, (const luaL_Reg *const[]){ fdbox_methods, NULL },
              fdbox_meta, NULL, NULL);
  lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
  lua_pushcfunction(L, fdbox_rebuild);
  mp_register_handle(L, "FdBox");
}
