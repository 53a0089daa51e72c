/*
 * conn.c: Connection, framed messages over a Unix stream socket, with fd
 * passing (SCM_RIGHTS) for handles.
 *
 * A message is a 16-byte header (payload length u64, number of fds u32,
 * kind u32: 0 raw bytes, 1 a serialized value), then the payload. The fds
 * ride on the first bytes of the message; the receiver keeps the fds that
 * arrive in a queue and hands a message exactly the number its header
 * names, so messages are never merged or split whatever their size.
 *
 * Reads go through a 64 KiB buffer so that small messages cost one read;
 * a payload larger than the buffer is read straight into its destination.
 * A timeout bounds the whole message: one that is not all there when it
 * runs out (a peer stalled halfway) is kept aside, header and fds
 * included, and the next recv goes on with it, so nothing is lost and a
 * stalled peer cannot hold a recv past its timeout. Without a timeout a
 * recv waits for the whole message.
 * Sends use MSG_NOSIGNAL: a closed peer is nil, "closed", never SIGPIPE.
 *
 * Signals: a blocking read, write, poll or accept that a signal interrupts
 * (EINTR), or a loop about to block again after a partial transfer, lets
 * the signal's Lua hook run (mp_interrupted; lua5.4's Ctrl-C raises
 * "interrupted!"). When it raises, the connection stays whole: the bytes
 * of a message that came stay buffered (a payload cut short is kept as the
 * half-received message, as a timeout keeps it) and the unsent rest of a
 * message that went in part is kept and goes first with the next send.
 */
#include "mp.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#define HDR_SIZE 16
#define RBUF_SIZE 65536
#define KIND_BYTES 0
#define KIND_VALUE 1

typedef struct mp_conn {
  int fd;              /* -1 when closed */
  int readable, writable;
  int eof;             /* the peer closed: nothing more will come */
  char *rbuf;          /* read buffer, RBUF_SIZE bytes */
  size_t rpos, rlen;   /* unread bytes are rbuf[rpos .. rlen) */
  mp_fdlist rfds;      /* fds received, not yet claimed by a message */
  int decode_flags;    /* MP_DECODE_UNTRUSTED until the peer is trusted */
  int unixsock;        /* can carry fds */
  /* a message whose header was read but whose payload did not all come
     before a recv's timeout: kept here, the next recv goes on with it */
  char *pbuf;          /* its payload so far (malloc'd, plen bytes) */
  size_t plen, pgot;
  uint32_t pkind;
  mp_fdlist pfds;      /* the fds that came with it */
  /* the rest of a message whose send a signal interrupted after its first
     bytes had gone: sent first by the next send */
  char *sbuf;          /* malloc'd, slen bytes, sbuf[spos .. slen) unsent */
  size_t slen, spos;
} mp_conn;

/* A signal's hook raised (mp_interrupted): its error is on the stack. */
#define RAISED (-3)

static mp_conn *to_conn(lua_State *L, int i) {
  return (mp_conn *)luaL_checkudata(L, i, MP_CONNECTION_T);
}

static mp_conn *check_conn(lua_State *L, int i) {
  mp_conn *c = to_conn(L, i);
  if (c->fd < 0) luaL_error(L, "connection is closed");
  return c;
}

/* Forget a half-received message. */
static void drop_partial(mp_conn *c) {
  free(c->pbuf);
  c->pbuf = NULL;
  c->plen = c->pgot = 0;
  mp_fdlist_close(&c->pfds);
}

/* Forget the unsent rest of a message. */
static void drop_unsent(mp_conn *c) {
  free(c->sbuf);
  c->sbuf = NULL;
  c->slen = c->spos = 0;
}

static void conn_release(mp_conn *c) {
  if (c->fd >= 0) close(c->fd);
  c->fd = -1;
  free(c->rbuf);
  c->rbuf = NULL;
  c->rpos = c->rlen = 0;
  mp_fdlist_close(&c->rfds);
  drop_partial(c);
  drop_unsent(c);
}

/* Push a closed connection with its send buffer as user value. */
static mp_conn *newconn(lua_State *L) {
  mp_conn *c = (mp_conn *)lua_newuserdatauv(L, sizeof(mp_conn), 1);
  memset(c, 0, sizeof *c);
  c->fd = -1;
  luaL_setmetatable(L, MP_CONNECTION_T);
  mp_buf_push(L, 0);
  lua_setiuservalue(L, -2, 1);
  return c;
}

static void conn_setfd(lua_State *L, mp_conn *c, int fd, int r, int w) {
  c->rbuf = (char *)malloc(RBUF_SIZE);
  if (c->rbuf == NULL) {
    close(fd);
    luaL_error(L, "not enough memory");
  }
  c->fd = fd;
  c->readable = r;
  c->writable = w;
  c->unixsock = 1;
}

/* core.Pipe([duplex=true]) -> c1, c2 */
static int conn_pipe(lua_State *L) {
  int duplex = lua_isnoneornil(L, 1) ? 1 : lua_toboolean(L, 1);
  int sv[2];
  mp_conn *a = newconn(L), *b = newconn(L);
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
    return luaL_error(L, "socketpair: %s", strerror(errno));
  if (!duplex) {
    shutdown(sv[0], SHUT_WR);
    shutdown(sv[1], SHUT_RD);
  }
  conn_setfd(L, a, sv[0], 1, duplex);
  conn_setfd(L, b, sv[1], duplex, 1);
  return 2;
}

/* core.conn_from_fd(fd, readable, writable) -> Connection owning fd */
static int conn_from_fd(lua_State *L) {
  int fd = (int)luaL_checkinteger(L, 1);
  int r = lua_toboolean(L, 2), w = lua_toboolean(L, 3);
  mp_conn *c;
  luaL_argcheck(L, fd >= 0, 1, "bad file descriptor");
  c = newconn(L);
  conn_setfd(L, c, fd, r, w);
  return 1;
}

/* ---- sending ------------------------------------------------------- */

static void put_header(char *h, uint64_t len, uint32_t nfds, uint32_t kind) {
  memcpy(h, &len, 8);
  memcpy(h + 8, &nfds, 4);
  memcpy(h + 12, &kind, 4);
}

/* Send the iovecs whole, the fds with the first bytes; the iovecs are
   advanced past what went. 0, or an errno. With L, a send that a signal
   interrupted (EINTR), or one about to block again after a partial write,
   lets the signal's hook run: RAISED when it raised (error pushed; *sent
   says whether any byte went). L NULL: resumes after EINTR. */
static int sendall(lua_State *L, int fd, struct iovec *iov, int *niovp,
                   const mp_fdlist *fds, int *sent) {
  union {
    char buf[CMSG_SPACE(sizeof(int) * MP_MAX_FDS)];
    struct cmsghdr align;
  } u;
  struct msghdr msg;
  int first = 1, niov = *niovp;
  *sent = 0;
  while (niov > 0) {
    ssize_t n;
    if (!first && L != NULL && mp_interrupted(L)) {   /* a partial write */
      *niovp = niov;
      return RAISED;
    }
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = iov;
    msg.msg_iovlen = (size_t)niov;
    if (first && fds && fds->n > 0) {
      struct cmsghdr *cm;
      size_t sz = sizeof(int) * (size_t)fds->n;
      memset(u.buf, 0, sizeof u.buf);
      msg.msg_control = u.buf;
      msg.msg_controllen = CMSG_SPACE(sz);
      cm = CMSG_FIRSTHDR(&msg);
      cm->cmsg_level = SOL_SOCKET;
      cm->cmsg_type = SCM_RIGHTS;
      cm->cmsg_len = CMSG_LEN(sz);
      memcpy(CMSG_DATA(cm), fds->fd, sz);
    }
    n = sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno != EINTR) {
        *niovp = niov;
        return errno;
      }
      if (L != NULL && mp_interrupted(L)) {
        *niovp = niov;
        return RAISED;
      }
      continue;
    }
    first = 0;
    *sent = 1;
    while (niov > 0 && (size_t)n >= iov->iov_len) {
      n -= (ssize_t)iov->iov_len;
      iov++;
      niov--;
    }
    if (niov > 0) {
      iov->iov_base = (char *)iov->iov_base + n;
      iov->iov_len -= (size_t)n;
    }
  }
  *niovp = 0;
  return 0;
}

MP_API int mp_sendall(int fd, struct iovec *iov, int niov, const mp_fdlist *fds) {
  int sent;
  return sendall(NULL, fd, iov, &niov, fds, &sent);
}

/* Send a message (n iovecs, the fds with its first bytes) on c: first the
   unsent rest of an interrupted one, then this one. 0, an errno, or
   RAISED (error pushed), when a signal's hook raised: then either nothing
   of this message went, or the part that did not go is kept (c->sbuf) and
   goes first with the next send. (Without memory to keep it, the stream
   cannot be whole again: its writing side is shut, so that the peer sees
   the message cut rather than waiting for the rest.) */
static int conn_sendmsg(lua_State *L, mp_conn *c, struct iovec *iov, int n,
                        const mp_fdlist *fds) {
  int r, sent, left = n, i;
  size_t rest = 0;
  if (c->sbuf != NULL) {
    struct iovec piece;
    int one = 1;
    piece.iov_base = c->sbuf + c->spos;
    piece.iov_len = c->slen - c->spos;
    r = sendall(L, c->fd, &piece, &one, NULL, &sent);
    if (r == RAISED) {
      c->spos = c->slen - piece.iov_len;
      return RAISED;
    }
    drop_unsent(c);
    if (r != 0) return r;
  }
  r = sendall(L, c->fd, iov, &left, fds, &sent);
  if (r != RAISED || !sent) return r;
  for (i = n - left; i < n; i++) rest += iov[i].iov_len;
  c->sbuf = (char *)malloc(rest > 0 ? rest : 1);
  if (c->sbuf == NULL) {
    shutdown(c->fd, SHUT_WR);
    return RAISED;
  }
  c->slen = rest;
  c->spos = 0;
  for (rest = 0, i = n - left; i < n; i++) {
    memcpy(c->sbuf + rest, iov[i].iov_base, iov[i].iov_len);
    rest += iov[i].iov_len;
  }
  return RAISED;
}

static int send_result(lua_State *L, int err) {
  if (err == RAISED) return lua_error(L);
  if (err == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  if (err == EPIPE || err == ECONNRESET) {
    lua_pushnil(L);
    lua_pushliteral(L, "closed");
    return 2;
  }
  return luaL_fileresult(L, 0, "send");
}

static mp_conn *check_writable(lua_State *L) {
  mp_conn *c = check_conn(L, 1);
  if (!c->writable) luaL_error(L, "connection is read-only");
  return c;
}

/* c:send(v) -> true | nil, "closed" */
static int conn_send(lua_State *L) {
  mp_conn *c = check_writable(L);
  mp_buf *b;
  mp_fdlist fds;
  struct iovec iov;
  luaL_checkany(L, 2);
  if (lua_isnil(L, 2)) return luaL_argerror(L, 2, "nil is not a message");
  lua_settop(L, 2);
  lua_getiuservalue(L, 1, 1);
  b = (mp_buf *)lua_touserdata(L, 3);
  b->len = 0;
  mp_buf_reserve(L, b, HDR_SIZE);
  b->len = HDR_SIZE;
  fds.n = 0;
  mp_encode(L, 2, b, &fds);
  if (fds.n > 0 && !c->unixsock)
    return mp_raise(L, "SerializationError",
                    "cannot send a handle (it carries file descriptors) over a TCP connection");
  put_header(b->data, b->len - HDR_SIZE, (uint32_t)fds.n, KIND_VALUE);
  iov.iov_base = b->data;
  iov.iov_len = b->len;
  return send_result(L, conn_sendmsg(L, c, &iov, 1, &fds));
}

/* c:send_bytes(s [, i [, j]]) -> true | nil, "closed" */
static int conn_send_bytes(lua_State *L) {
  mp_conn *c = check_writable(L);
  size_t len;
  const char *s = luaL_checklstring(L, 2, &len);
  lua_Integer i = luaL_optinteger(L, 3, 1), j = luaL_optinteger(L, 4, -1);
  char h[HDR_SIZE];
  struct iovec iov[2];
  /* string.sub's rules for i, j */
  if (i < 0) i = (lua_Integer)len + i + 1 > 0 ? (lua_Integer)len + i + 1 : 1;
  else if (i == 0) i = 1;
  if (j < 0) j = (lua_Integer)len + j + 1;
  else if (j > (lua_Integer)len) j = (lua_Integer)len;
  if (i > j) i = j + 1;
  put_header(h, (uint64_t)(j - i + 1), 0, KIND_BYTES);
  iov[0].iov_base = h;
  iov[0].iov_len = HDR_SIZE;
  iov[1].iov_base = (char *)(uintptr_t)(s + i - 1);
  iov[1].iov_len = (size_t)(j - i + 1);
  return send_result(L, conn_sendmsg(L, c, iov, 2, NULL));
}

/* ---- receiving ----------------------------------------------------- */

/* One recvmsg of up to len bytes into p; the fds that came are added to
   fds (beyond MP_MAX_FDS closed). >0 bytes, 0 at end of stream, -1 on
   error (errno; EAGAIN with MSG_DONTWAIT; EINTR when a signal interrupted
   it before anything came: the caller decides whether to read again). */
MP_API ssize_t mp_recv_fds(int fd, char *p, size_t len, int flags, mp_fdlist *fds) {
  union {
    char buf[CMSG_SPACE(sizeof(int) * MP_MAX_FDS)];
    struct cmsghdr align;
  } u;
  struct msghdr msg;
  struct iovec iov;
  struct cmsghdr *cm;
  ssize_t n;
  iov.iov_base = p;
  iov.iov_len = len;
  memset(&msg, 0, sizeof msg);
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = u.buf;
  msg.msg_controllen = sizeof u.buf;
  n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | flags);
  if (n <= 0 || msg.msg_controllen == 0) return n;
  for (cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
    if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
      int k = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int)), i;
      int *got = (int *)(void *)CMSG_DATA(cm);
      for (i = 0; i < k; i++) {
        if (fds->n < MP_MAX_FDS) fds->fd[fds->n++] = got[i];
        else close(got[i]);
      }
    }
  }
  return n;
}

/* One read into p for c, its fds queued on c. A read that a signal
   interrupted lets the signal's hook run (mp_interrupted) and reads again:
   RAISED when the hook raised (error pushed). */
static ssize_t rawread(lua_State *L, mp_conn *c, char *p, size_t len, int flags) {
  for (;;) {
    ssize_t n = mp_recv_fds(c->fd, p, len, flags, &c->rfds);
    if (n == 0) c->eof = 1;
    if (n >= 0 || errno != EINTR) return n;
    if (mp_interrupted(L)) return RAISED;
  }
}

/* poll() for input on c until the deadline (-1 forever): >0 ready, 0 the
   deadline passed, -1 error, RAISED. A signal's hook may run before the
   wait and after an EINTR, which resumes with the time that is left. */
static int poll_in(lua_State *L, mp_conn *c, double deadline) {
  struct pollfd pfd;
  int r;
  pfd.fd = c->fd;
  pfd.events = POLLIN;
  for (;;) {
    if (mp_interrupted(L)) return RAISED;
    r = poll(&pfd, 1, mp_remaining_ms(deadline));
    if (r >= 0 || errno != EINTR) return r;
  }
}

/* Read without blocking into dst (holding *got of cap bytes) until it
   holds want, waiting for more up to the deadline: 1 done, 0 end of
   stream, -1 error, -2 the deadline passed, RAISED (what came is counted
   in *got). */
static int read_timed(lua_State *L, mp_conn *c, char *dst, size_t *got,
                      size_t want, size_t cap, double deadline) {
  while (*got < want) {
    ssize_t r = rawread(L, c, dst + *got, cap - *got, MSG_DONTWAIT);
    if (r > 0) {
      *got += (size_t)r;
      continue;
    }
    if (r == 0) return 0;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
    r = poll_in(L, c, deadline);
    if (r == RAISED) return RAISED;
    if (r <= 0) return r < 0 ? -1 : -2;
  }
  return 1;
}

/* Make sure at least n (<= RBUF_SIZE) bytes are buffered, within the
   deadline (-1: blocking reads). 1 ok, 0 end of stream first, -1 error,
   -2 the deadline passed, RAISED (what came stays buffered either way). */
static int fill(lua_State *L, mp_conn *c, size_t n, double deadline) {
  int more = 0;
  if (c->rlen - c->rpos >= n) return 1;
  if (c->rpos > 0) {
    memmove(c->rbuf, c->rbuf + c->rpos, c->rlen - c->rpos);
    c->rlen -= c->rpos;
    c->rpos = 0;
  }
  if (deadline >= 0)
    return read_timed(L, c, c->rbuf, &c->rlen, n, RBUF_SIZE, deadline);
  while (c->rlen < n) {
    ssize_t r;
    /* about to block again after a short read: a signal may have come */
    if (more++ && mp_interrupted(L)) return RAISED;
    r = rawread(L, c, c->rbuf + c->rlen, RBUF_SIZE - c->rlen, 0);
    if (r <= 0) return (int)r;
    c->rlen += (size_t)r;
  }
  return 1;
}

/* Copy len payload bytes to dst: first what is buffered, then read the
   rest straight into dst. 1, 0 end of stream, -1 error, or RAISED with
   *have the bytes in dst. */
static int readinto(lua_State *L, mp_conn *c, char *dst, size_t len,
                    size_t *have) {
  size_t h = c->rlen - c->rpos;
  int more = 0;
  if (h > len) h = len;
  memcpy(dst, c->rbuf + c->rpos, h);
  c->rpos += h;
  while (h < len) {
    ssize_t r;
    if (more++ && mp_interrupted(L)) r = RAISED;
    else r = rawread(L, c, dst + h, len - h, 0);
    if (r == RAISED) {
      *have = h;
      return RAISED;
    }
    if (r <= 0) return (int)r;
    h += (size_t)r;
  }
  return 1;
}

/* Is something to read there (or the end of the stream)? Waits until the
   deadline (-1 forever). 1 yes, 0 no, -1 error, RAISED. Waiting forever
   needs no poll: the read that follows blocks. Otherwise a non-blocking
   read comes first, so a message already there costs no poll. */
static int wait_readable(lua_State *L, mp_conn *c, double deadline) {
  ssize_t n;
  if (c->rlen > c->rpos || c->eof || deadline < 0) return 1;
  if (c->rpos == c->rlen) c->rpos = c->rlen = 0;
  n = rawread(L, c, c->rbuf + c->rlen, RBUF_SIZE - c->rlen, MSG_DONTWAIT);
  if (n > 0) {
    c->rlen += (size_t)n;
    return 1;
  }
  if (n == 0) return 1;                   /* end of stream */
  if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
  if (mp_remaining_ms(deadline) == 0) return 0;
  return poll_in(L, c, deadline);
}

/* Go on reading the half-received message until it is whole or the
   deadline passes: 1 whole, 0 end of stream, -1 error, -2 deadline,
   RAISED (what came is kept). */
static int read_partial(lua_State *L, mp_conn *c, double deadline) {
  size_t have = c->rlen - c->rpos;
  if (have > c->plen - c->pgot) have = c->plen - c->pgot;
  memcpy(c->pbuf + c->pgot, c->rbuf + c->rpos, have);
  c->rpos += have;
  c->pgot += have;
  return read_timed(L, c, c->pbuf, &c->pgot, c->plen, c->plen, deadline);
}

static mp_conn *check_readable(lua_State *L) {
  mp_conn *c = check_conn(L, 1);
  if (!c->readable) luaL_error(L, "connection is write-only");
  return c;
}

static int ret_reason(lua_State *L, const char *why) {
  lua_pushnil(L);
  lua_pushstring(L, why);
  return 2;
}

/* Claim n fds from the queue for a message (header already read). */
static void claim_fds(lua_State *L, mp_conn *c, uint32_t n, mp_fdlist *out) {
  out->n = 0;
  if (n == 0) return;
  if (n > (uint32_t)c->rfds.n)
    luaL_error(L, "message announced %d fds but %d arrived", (int)n, c->rfds.n);
  memcpy(out->fd, c->rfds.fd, sizeof(int) * n);
  out->n = (int)n;
  memmove(c->rfds.fd, c->rfds.fd + n, sizeof(int) * (size_t)(c->rfds.n - (int)n));
  c->rfds.n -= (int)n;
}

/* Push the half-received message, now whole, as recv_message would. */
static int push_partial(lua_State *L, mp_conn *c, int as_value) {
  mp_buf *b;
  mp_fdlist fds = c->pfds;
  c->pfds.n = 0;
  if (!as_value || c->pkind == KIND_BYTES) {
    mp_fdlist_close(&fds);
    lua_pushlstring(L, c->pbuf, c->plen);
    drop_partial(c);
    return 1;
  }
  b = mp_buf_push(L, 0);                  /* owns the payload from here */
  b->data = c->pbuf;
  b->len = b->cap = c->plen;
  c->pbuf = NULL;
  c->plen = c->pgot = 0;
  mp_decode(L, b->data, b->len, &fds, c->decode_flags);
  lua_remove(L, -2);                      /* the buffer */
  return 1;
}

/* Read the rest of the half-received message within the deadline and
   push it, or push nil, "timeout" and keep it; a signal's hook that
   raises leaves it kept too. */
static int finish_partial(lua_State *L, mp_conn *c, int as_value, double deadline) {
  int r = read_partial(L, c, deadline);
  if (r == RAISED) return lua_error(L);
  if (r == -2) return ret_reason(L, "timeout");
  if (r <= 0) {
    int e = errno;
    drop_partial(c);
    if (r == 0) return luaL_error(L, "connection closed in the middle of a message");
    errno = e;
    return luaL_fileresult(L, 0, "recv");
  }
  return push_partial(L, c, as_value);
}

/* A blocking read of a payload was interrupted (RAISED, the error on the
   stack): keep the message as the half-received one (have of len bytes
   in got, which it takes when owned, else copies; its fds) so that the
   next recv goes on with it; then raise. Without the memory for it the
   stream cannot be resynchronized: the connection is released. */
static int keep_partial(lua_State *L, mp_conn *c, char *got, int owned,
                        size_t have, size_t len, uint32_t kind, mp_fdlist *fds) {
  char *p = owned ? got : (char *)malloc(len > 0 ? len : 1);
  if (p == NULL) {
    mp_fdlist_close(fds);
    conn_release(c);
    return lua_error(L);
  }
  if (!owned) memcpy(p, got, have);
  c->pbuf = p;
  c->plen = len;
  c->pgot = have;
  c->pkind = kind;
  c->pfds = *fds;
  fds->n = 0;
  return lua_error(L);
}

/* Receive one message: pushes the payload as a string (as_value 0) or its
   decoded value (as_value 1); returns the number of results. With a
   timeout, the whole message must come in time: a message cut by the
   timeout is kept (header and fds included) and the next recv goes on
   with it, so nothing is lost and a stalled peer cannot hold a recv past
   its timeout. A signal whose hook raises (lua5.4's Ctrl-C) interrupts
   any wait here the same way: what came is kept for the next recv. */
static int recv_message(lua_State *L, int as_value, uint64_t maxlen) {
  mp_conn *c = check_readable(L);
  double deadline = mp_deadline(mp_opttimeout(L, 2));
  uint64_t len;
  uint32_t nfds, kind;
  mp_fdlist fds;
  size_t have = 0;
  int r;
  if (c->pbuf != NULL) return finish_partial(L, c, as_value, deadline);
  r = wait_readable(L, c, deadline);
  if (r == RAISED) return lua_error(L);
  if (r < 0) return luaL_fileresult(L, 0, "poll");
  if (r == 0) return ret_reason(L, "timeout");
  r = fill(L, c, HDR_SIZE, deadline);
  if (r == RAISED) return lua_error(L);   /* the header's bytes stay buffered */
  if (r == -2) return ret_reason(L, "timeout");
  if (r == 0) {
    if (c->rlen > c->rpos) return luaL_error(L, "connection closed in the middle of a message");
    return ret_reason(L, "closed");
  }
  if (r < 0) return luaL_fileresult(L, 0, "recv");
  memcpy(&len, c->rbuf + c->rpos, 8);
  memcpy(&nfds, c->rbuf + c->rpos + 8, 4);
  memcpy(&kind, c->rbuf + c->rpos + 12, 4);
  if (nfds > MP_MAX_FDS || kind > KIND_VALUE || len > (uint64_t)SIZE_MAX / 2)
    return luaL_error(L, "corrupt message header");
  if (len > maxlen) {
    conn_release(c);       /* the stream cannot be resynchronized */
    return luaL_error(L, "message of %I bytes is longer than the %I allowed",
                      (lua_Integer)len, (lua_Integer)maxlen);
  }
  c->rpos += HDR_SIZE;
  claim_fds(L, c, nfds, &fds);
  if (deadline >= 0 && c->rlen - c->rpos < len) {
    /* not all here yet, and a timeout to keep: assemble it aside */
    c->pbuf = (char *)malloc(len > 0 ? (size_t)len : 1);
    if (c->pbuf == NULL) {
      mp_fdlist_close(&fds);
      conn_release(c);     /* its payload cannot be skipped either */
      return luaL_error(L, "not enough memory for a message of %I bytes",
                        (lua_Integer)len);
    }
    c->plen = (size_t)len;
    c->pgot = 0;
    c->pkind = kind;
    c->pfds = fds;
    return finish_partial(L, c, as_value, deadline);
  }
  if (!as_value || kind == KIND_BYTES) {
    /* bytes: straight into a Lua string buffer */
    luaL_Buffer B;
    char *p;
    mp_fdlist_close(&fds);
    p = luaL_buffinitsize(L, &B, (size_t)len);
    r = readinto(L, c, p, (size_t)len, &have);
    if (r == RAISED) return keep_partial(L, c, p, 0, have, (size_t)len, kind, &fds);
    if (r <= 0) return luaL_error(L, "connection closed in the middle of a message");
    luaL_pushresultsize(&B, (size_t)len);
    return 1;
  }
  if (c->rlen - c->rpos >= len) {         /* all buffered: decode in place */
    const char *p = c->rbuf + c->rpos;
    c->rpos += (size_t)len;
    mp_decode(L, p, (size_t)len, &fds, c->decode_flags);
    return 1;
  } else {
    int top = lua_gettop(L);
    mp_buf *b = mp_buf_push(L, (size_t)len);
    r = readinto(L, c, b->data, (size_t)len, &have);
    if (r == RAISED) {                    /* the payload's memory goes to c */
      char *p = b->data;
      b->data = NULL;
      b->len = b->cap = 0;
      return keep_partial(L, c, p, 1, have, (size_t)len, kind, &fds);
    }
    if (r <= 0) {
      mp_fdlist_close(&fds);
      return luaL_error(L, "connection closed in the middle of a message");
    }
    mp_decode(L, b->data, (size_t)len, &fds, c->decode_flags);
    lua_remove(L, top + 1);               /* the buffer */
    return 1;
  }
}

/* c:recv([timeout]) -> v | nil, "closed" | nil, "timeout" */
static int conn_recv(lua_State *L) { return recv_message(L, 1, UINT64_MAX); }

/* c:recv_bytes([timeout]) -> s | nil, "closed" | nil, "timeout" */
static int conn_recv_bytes(lua_State *L) { return recv_message(L, 0, UINT64_MAX); }

/* c:_recv_bytes_max(timeout, maxlen): for handshakes with an untrusted
   peer, whose length field must not make us allocate */
static int conn__recv_bytes_max(lua_State *L) {
  lua_Integer max = luaL_checkinteger(L, 3);
  luaL_argcheck(L, max >= 0, 3, "must be >= 0");
  lua_settop(L, 2);
  return recv_message(L, 0, (uint64_t)max);
}

/* c:_set_trusted(b): a trusted peer may send functions (bytecode) and
   handles (fds) */
static int conn__set_trusted(lua_State *L) {
  mp_conn *c = check_conn(L, 1);
  c->decode_flags = lua_toboolean(L, 2) ? 0 : MP_DECODE_UNTRUSTED;
  return 0;
}

/* c:poll([timeout=0]) -> boolean */
static int conn_poll(lua_State *L) {
  mp_conn *c = check_readable(L);
  double t = lua_isnoneornil(L, 2) ? 0 : mp_opttimeout(L, 2);
  int r = wait_readable(L, c, mp_deadline(t));
  if (r == RAISED) return lua_error(L);
  if (r < 0) return luaL_fileresult(L, 0, "poll");
  lua_pushboolean(L, r > 0);
  return 1;
}

/* c:fileno() -> fd */
static int conn_fileno(lua_State *L) {
  lua_pushinteger(L, check_conn(L, 1)->fd);
  return 1;
}

/* c:_buffered() -> true when a message (or its start) is already buffered,
   which a poll() on the fd would not see */
static int conn__buffered(lua_State *L) {
  mp_conn *c = to_conn(L, 1);
  lua_pushboolean(L, c->fd >= 0 && (c->rlen > c->rpos || c->eof));
  return 1;
}

/* c:close(); may be called twice */
static int conn_close(lua_State *L) {
  conn_release(to_conn(L, 1));
  return 0;
}

static int conn__tostring(lua_State *L) {
  mp_conn *c = to_conn(L, 1);
  if (c->fd < 0) lua_pushliteral(L, "<Connection(closed)>");
  else
    lua_pushfstring(L, "<Connection(fd=%d, %s)>", c->fd,
                    c->readable && c->writable ? "duplex"
                    : c->readable ? "read-only" : "write-only");
  return 1;
}

static int conn__index(lua_State *L) {
  mp_conn *c = to_conn(L, 1);
  const char *k = lua_tostring(L, 2);
  lua_pushvalue(L, 2);
  if (lua_rawget(L, lua_upvalueindex(1)) != LUA_TNIL) return 1;
  if (k == NULL) return 0;
  if (strcmp(k, "closed") == 0) lua_pushboolean(L, c->fd < 0);
  else if (strcmp(k, "readable") == 0) lua_pushboolean(L, c->fd >= 0 && c->readable);
  else if (strcmp(k, "writable") == 0) lua_pushboolean(L, c->fd >= 0 && c->writable);
  else return 0;
  return 1;
}

/* __mp_reduce(c) -> "Connection", {readable, writable}, fd
   (for the codec: the receiver rebuilds a connection on its copy of fd) */
static int conn__reduce(lua_State *L) {
  mp_conn *c = check_conn(L, 1);
  if (c->rlen > c->rpos || c->pbuf != NULL)
    return mp_raise(L, "SerializationError",
                    "cannot send a connection with unread buffered data");
  if (c->sbuf != NULL)
    return mp_raise(L, "SerializationError",
                    "cannot send a connection with a message half sent "
                    "(a signal interrupted its send; the next send finishes it)");
  lua_pushliteral(L, "Connection");
  lua_createtable(L, 2, 0);
  lua_pushboolean(L, c->readable);
  lua_rawseti(L, -2, 1);
  lua_pushboolean(L, c->writable);
  lua_rawseti(L, -2, 2);
  lua_pushinteger(L, c->fd);
  return 3;
}

/* core.poll(fds, [timeout]) -> list of the positions in fds that are
   readable (or hung up); empty on timeout. A signal's hook may raise from
   the wait (mp_interrupted); otherwise it resumes with the time left. */
static int core_poll(lua_State *L) {
  struct pollfd stackfds[64], *pfd = stackfds;
  lua_Integer n, i, k = 0;
  double deadline;
  int r;
  luaL_checktype(L, 1, LUA_TTABLE);
  deadline = mp_deadline(mp_opttimeout(L, 2));
  n = (lua_Integer)lua_rawlen(L, 1);
  if (n > 64) pfd = (struct pollfd *)lua_newuserdatauv(L, sizeof(*pfd) * (size_t)n, 0);
  for (i = 0; i < n; i++) {
    lua_rawgeti(L, 1, i + 1);
    pfd[i].fd = (int)luaL_checkinteger(L, -1);
    pfd[i].events = POLLIN;
    pfd[i].revents = 0;
    lua_pop(L, 1);
  }
  for (;;) {
    r = poll(pfd, (nfds_t)n, mp_remaining_ms(deadline));
    if (r >= 0 || errno != EINTR) break;
    if (mp_interrupted(L)) return lua_error(L);
  }
  if (r < 0) return luaL_fileresult(L, 0, "poll");
  lua_createtable(L, r, 0);
  for (i = 0; i < n; i++)
    if (pfd[i].revents) {
      lua_pushinteger(L, i + 1);
      lua_rawseti(L, -2, ++k);
    }
  return 1;
}

/* core._fd_is_open(n) -> boolean: n is an open file descriptor (poll()
   skips a negative one and reports a closed one as ready) */
static int core_fd_is_open(lua_State *L) {
  lua_Integer fd = luaL_checkinteger(L, 1);
  lua_pushboolean(L, fd >= 0 && fd <= INT_MAX && fcntl((int)fd, F_GETFD) != -1);
  return 1;
}

/* ---- Listener and client sockets ----------------------------------- */

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
    if (fd < 0) return luaL_error(L, "socket: %s", strerror(errno));
    if (bind(fd, (struct sockaddr *)&sa, (socklen_t)len) != 0 || listen(fd, backlog) != 0) {
      e = errno;
      close(fd);
      return luaL_error(L, "cannot listen on '%s': %s", host, strerror(e));
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
      return luaL_error(L, "cannot listen on '%s:%s': %s", host, port, strerror(e));
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
    return luaL_error(L, "getsockname: %s", strerror(errno));
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
  if (r == 0) return ret_reason(L, "timeout");
  c = newconn(L);
  for (;;) {
    fd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
    if (fd >= 0 || errno != EINTR) break;
    if (mp_interrupted(L)) return lua_error(L);
  }
  if (fd < 0) return luaL_fileresult(L, 0, "accept");
  tune(fd, l->unixsock);
  conn_setfd(L, c, fd, 1, 1);
  c->unixsock = l->unixsock;
  c->decode_flags = MP_DECODE_UNTRUSTED;
  return 1;
}

/* connect() fd to sa. A connect that a signal interrupts goes on in the
   background: wait for it (poll for writing), letting the signal's hook
   run (mp_interrupted) after each interruption. 0, an errno, or RAISED. */
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
    if (mp_interrupted(L)) return RAISED;
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
  mp_conn *c = newconn(L);
  if (is_unix) {
    struct sockaddr_un sa;
    int len = unix_addr(L, host, &sa);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return luaL_error(L, "socket: %s", strerror(errno));
    e = connect_fd(L, fd, (struct sockaddr *)&sa, (socklen_t)len);
    if (e != 0) {
      close(fd);
      if (e == RAISED) return lua_error(L);
      return luaL_error(L, "cannot connect to '%s': %s", host, strerror(e));
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
      if (e == RAISED) break;
    }
    freeaddrinfo(res);
    if (e == RAISED) return lua_error(L);
    if (fd < 0)
      return luaL_error(L, "cannot connect to '%s:%s': %s", host, port, strerror(e));
  }
  tune(fd, is_unix);
  conn_setfd(L, c, fd, 1, 1);
  c->unixsock = is_unix;
  c->decode_flags = MP_DECODE_UNTRUSTED;
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

static int conn__gc(lua_State *L) {
  conn_release(to_conn(L, 1));
  return 0;
}

static const luaL_Reg conn_methods[] = {
  {"send", conn_send},
  {"recv", conn_recv},
  {"send_bytes", conn_send_bytes},
  {"recv_bytes", conn_recv_bytes},
  {"poll", conn_poll},
  {"fileno", conn_fileno},
  {"close", conn_close},
  {"_buffered", conn__buffered},
  {"_recv_bytes_max", conn__recv_bytes_max},
  {"_set_trusted", conn__set_trusted},
  {NULL, NULL}
};

MP_API void mp_conn_open(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"Pipe", conn_pipe},
    {"conn_from_fd", conn_from_fd},
    {"poll", core_poll},
    {"_fd_is_open", core_fd_is_open},
    {"listen", core_listen},
    {"connect", core_connect},
    {NULL, NULL}
  };
  static const luaL_Reg conn_meta[] = {
    {"__gc", conn__gc}, {"__close", conn__gc}, {"__tostring", conn__tostring},
    {"__mp_reduce", conn__reduce}, {NULL, NULL}
  };
  static const luaL_Reg listener_meta[] = {
    {"__gc", listener_close}, {"__close", listener_close}, {NULL, NULL}
  };
  mp_newclass(L, MP_CONNECTION_T, (const luaL_Reg *const[]){ conn_methods, NULL },
              conn_meta, conn__index, "Connection_methods");
  lua_pop(L, 1);
  /* connection.lua adds accept to the methods and fields to the metatable */
  mp_newclass(L, MP_LISTENER_T, (const luaL_Reg *const[]){ listener_methods, NULL },
              listener_meta, NULL, "Listener_methods");
  lua_setfield(L, -2, "Listener_mt");
  luaL_setfuncs(L, funcs, 0);
}
