/*
 * conn.c: Connection, framed messages over a stream socket (a socketpair,
 * or a socket from listener.c), with fd passing (SCM_RIGHTS) for handles
 * on Unix sockets.
 *
 * A message is one frame (wire.c): a 16-byte header (payload length,
 * number of fds, kind MP_FRAME_BYTES or MP_FRAME_VALUE: a codec message),
 * then the payload. The fds ride on the first bytes of the message; the
 * receiver keeps the fds that arrive in a queue and hands a message
 * exactly the number its header names, so messages are never merged or
 * split whatever their size.
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
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define RBUF_SIZE 65536

#define CONN_MAGIC 0x4d50434f4e4eu   /* "MPCONN": never a user address */

struct mp_conn {
  uint64_t magic;      /* CONN_MAGIC: to_conn's check, as sync.h's */
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
};

/* a full userdata of our size with our magic (mp_tomagic: no registry
   look-up) */
static mp_conn *to_conn(lua_State *L, int i) {
  mp_conn *c = (mp_conn *)mp_tomagic(L, i, sizeof(mp_conn), CONN_MAGIC);
  if (__builtin_expect(c != NULL, 1)) return c;
  luaL_typeerror(L, i, MP_CONNECTION_T);
  return NULL;
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

/* The send buffer is the user value. */
MP_API mp_conn *mp_conn_push(lua_State *L) {
  mp_conn *c = (mp_conn *)lua_newuserdatauv(L, sizeof(mp_conn), 1);
  memset(c, 0, sizeof *c);
  c->magic = CONN_MAGIC;
  c->fd = -1;
  luaL_setmetatable(L, MP_CONNECTION_T);
  mp_buf_push(L, 0);
  lua_setiuservalue(L, -2, 1);
  return c;
}

MP_API void mp_conn_setfd(lua_State *L, mp_conn *c, int fd, int r, int w,
                          int unixsock, int trusted) {
  c->rbuf = (char *)malloc(RBUF_SIZE);
  if (c->rbuf == NULL) {
    close(fd);
    luaL_error(L, "not enough memory");
  }
  c->fd = fd;
  c->readable = r;
  c->writable = w;
  c->unixsock = unixsock;
  c->decode_flags = trusted ? 0 : MP_DECODE_UNTRUSTED;
}

/* core.Pipe([duplex=true]) -> c1, c2 */
static int conn_pipe(lua_State *L) {
  int duplex = lua_isnoneornil(L, 1) ? 1 : lua_toboolean(L, 1);
  int sv[2];
  mp_conn *a = mp_conn_push(L), *b = mp_conn_push(L);
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
    return mp_raise_errno(L, errno, "socketpair");
  if (!duplex) {
    shutdown(sv[0], SHUT_WR);
    shutdown(sv[1], SHUT_RD);
  }
  mp_conn_setfd(L, a, sv[0], 1, duplex, 1, 1);
  mp_conn_setfd(L, b, sv[1], duplex, 1, 1, 1);
  return 2;
}

/* core.conn_from_fd(fd, readable, writable) -> Connection owning fd */
static int conn_from_fd(lua_State *L) {
  int fd = (int)luaL_checkinteger(L, 1);
  int r = lua_toboolean(L, 2), w = lua_toboolean(L, 3);
  mp_conn *c;
  luaL_argcheck(L, fd >= 0, 1, "bad file descriptor");
  c = mp_conn_push(L);
  mp_conn_setfd(L, c, fd, r, w, 1, 1);
  return 1;
}

/* rebuild(state, fd) of a Connection handle: state is {readable, writable}
   (conn__reduce) */
static int conn_rebuild(lua_State *L) {
  int fd = (int)luaL_checkinteger(L, 2), r, w;
  mp_conn *c;
  luaL_argcheck(L, fd >= 0, 2, "bad file descriptor");
  if (!lua_istable(L, 1)) {              /* it owns fd: close it */
    close(fd);
    return mp_raise(L, "SerializationError", "a Connection handle's state "
                    "must be a table, got %s", luaL_typename(L, 1));
  }
  lua_rawgeti(L, 1, 1);
  r = lua_toboolean(L, -1);
  lua_rawgeti(L, 1, 2);
  w = lua_toboolean(L, -1);
  lua_pop(L, 2);
  c = mp_conn_push(L);
  mp_conn_setfd(L, c, fd, r, w, 1, 1);
  return 1;
}

/* ---- sending ------------------------------------------------------- */

/* Send a message (n iovecs, the fds with its first bytes) on c: first the
   unsent rest of an interrupted one, then this one. 0, an errno, or
   MP_RAISED (error pushed), when a signal's hook raised: then either nothing
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
    r = mp_sendv(L, c->fd, &piece, &one, NULL, 0, &sent);
    if (r == MP_RAISED) {
      c->spos = c->slen - piece.iov_len;
      return MP_RAISED;
    }
    drop_unsent(c);
    if (r != 0) return r;
  }
  r = mp_sendv(L, c->fd, iov, &left, fds, 0, &sent);
  if (r != MP_RAISED || !sent) return r;
  for (i = n - left; i < n; i++) rest += iov[i].iov_len;
  c->sbuf = (char *)malloc(rest > 0 ? rest : 1);
  if (c->sbuf == NULL) {
    shutdown(c->fd, SHUT_WR);
    return MP_RAISED;
  }
  c->slen = rest;
  c->spos = 0;
  for (rest = 0, i = n - left; i < n; i++) {
    memcpy(c->sbuf + rest, iov[i].iov_base, iov[i].iov_len);
    rest += iov[i].iov_len;
  }
  return MP_RAISED;
}

static int send_result(lua_State *L, int err) {
  if (err == MP_RAISED) return lua_error(L);
  if (err == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  if (err == EPIPE || err == ECONNRESET) return mp_reason(L, "closed");
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
  mp_buf_reserve(L, b, MP_FRAME_HDR);
  b->len = MP_FRAME_HDR;
  fds.n = 0;
  mp_encode(L, 2, b, &fds);
  if (fds.n > 0 && !c->unixsock)
    return mp_raise(L, "SerializationError",
                    "cannot send a handle (it carries file descriptors) over a TCP connection");
  mp_frame_put(b->data, b->len - MP_FRAME_HDR, (uint32_t)fds.n, MP_FRAME_VALUE);
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
  char h[MP_FRAME_HDR];
  struct iovec iov[2];
  /* string.sub's rules for i, j */
  if (i < 0) i = (lua_Integer)len + i + 1 > 0 ? (lua_Integer)len + i + 1 : 1;
  else if (i == 0) i = 1;
  if (j < 0) j = (lua_Integer)len + j + 1;
  else if (j > (lua_Integer)len) j = (lua_Integer)len;
  if (i > j) i = j + 1;
  mp_frame_put(h, (uint64_t)(j - i + 1), 0, MP_FRAME_BYTES);
  iov[0].iov_base = h;
  iov[0].iov_len = MP_FRAME_HDR;
  iov[1].iov_base = (char *)(uintptr_t)(s + i - 1);
  iov[1].iov_len = (size_t)(j - i + 1);
  return send_result(L, conn_sendmsg(L, c, iov, 2, NULL));
}

/* ---- receiving ----------------------------------------------------- */

/* One read into p for c, its fds queued on c. A read that a signal
   interrupted lets the signal's hook run (mp_interrupted) and reads again:
   MP_RAISED when the hook raised (error pushed). */
static ssize_t rawread(lua_State *L, mp_conn *c, char *p, size_t len, int flags) {
  for (;;) {
    ssize_t n = mp_recv_fds(c->fd, p, len, flags, &c->rfds, NULL);
    if (n == 0) c->eof = 1;
    if (n >= 0 || errno != EINTR) return n;
    if (mp_interrupted(L)) return MP_RAISED;
  }
}

/* poll() for input on c until the deadline (-1 forever): >0 ready, 0 the
   deadline passed, -1 error, MP_RAISED. A signal's hook may run before the
   wait and after an EINTR, which resumes with the time that is left. */
static int poll_in(lua_State *L, mp_conn *c, double deadline) {
  struct pollfd pfd;
  int r;
  pfd.fd = c->fd;
  pfd.events = POLLIN;
  for (;;) {
    if (mp_interrupted(L)) return MP_RAISED;
    r = poll(&pfd, 1, mp_remaining_ms(deadline));
    if (r >= 0 || errno != EINTR) return r;
  }
}

/* Read without blocking into dst (holding *got of cap bytes) until it
   holds want, waiting for more up to the deadline: 1 done, 0 end of
   stream, -1 error, -2 the deadline passed, MP_RAISED (what came is counted
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
    if (r == MP_RAISED) return MP_RAISED;  /* a signal's hook raised */
    if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
    r = poll_in(L, c, deadline);
    if (r == MP_RAISED) return MP_RAISED;
    if (r <= 0) return r < 0 ? -1 : -2;
  }
  return 1;
}

/* Make sure at least n (<= RBUF_SIZE) bytes are buffered, within the
   deadline (-1: blocking reads). 1 ok, 0 end of stream first, -1 error,
   -2 the deadline passed, MP_RAISED (what came stays buffered either way). */
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
    if (more++ && mp_interrupted(L)) return MP_RAISED;
    r = rawread(L, c, c->rbuf + c->rlen, RBUF_SIZE - c->rlen, 0);
    if (r <= 0) return (int)r;
    c->rlen += (size_t)r;
  }
  return 1;
}

/* Copy len payload bytes to dst: first what is buffered, then read the
   rest straight into dst. 1, 0 end of stream, -1 error, or MP_RAISED with
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
    if (more++ && mp_interrupted(L)) r = MP_RAISED;
    else r = rawread(L, c, dst + h, len - h, 0);
    if (r == MP_RAISED) {
      *have = h;
      return MP_RAISED;
    }
    if (r <= 0) return (int)r;
    h += (size_t)r;
  }
  return 1;
}

/* Is something to read there (or the end of the stream)? Waits until the
   deadline (-1 forever). 1 yes, 0 no, -1 error, MP_RAISED. Waiting forever
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
  if (n == MP_RAISED) return MP_RAISED;   /* a signal's hook raised */
  if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
  if (mp_remaining_ms(deadline) == 0) return 0;
  return poll_in(L, c, deadline);
}

/* Go on reading the half-received message until it is whole or the
   deadline passes: 1 whole, 0 end of stream, -1 error, -2 deadline,
   MP_RAISED (what came is kept). */
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
  if (!as_value || c->pkind == MP_FRAME_BYTES) {
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
  if (r == MP_RAISED) return lua_error(L);
  if (r == -2) return mp_reason(L, "timeout");
  if (r <= 0) {
    int e = errno;
    drop_partial(c);
    if (r == 0) return luaL_error(L, "connection closed in the middle of a message");
    errno = e;
    return luaL_fileresult(L, 0, "recv");
  }
  return push_partial(L, c, as_value);
}

/* A blocking read of a payload was interrupted (MP_RAISED, the error on the
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
  mp_frame h;
  uint64_t len;
  uint32_t kind;
  mp_fdlist fds;
  size_t have = 0;
  int r;
  if (c->pbuf != NULL) return finish_partial(L, c, as_value, deadline);
  r = wait_readable(L, c, deadline);
  if (r == MP_RAISED) return lua_error(L);
  if (r < 0) return luaL_fileresult(L, 0, "poll");
  if (r == 0) return mp_reason(L, "timeout");
  r = fill(L, c, MP_FRAME_HDR, deadline);
  if (r == MP_RAISED) return lua_error(L);   /* the header's bytes stay buffered */
  if (r == -2) return mp_reason(L, "timeout");
  if (r == 0) {
    if (c->rlen > c->rpos) return luaL_error(L, "connection closed in the middle of a message");
    return mp_reason(L, "closed");
  }
  if (r < 0) return luaL_fileresult(L, 0, "recv");
  mp_frame_get(c->rbuf + c->rpos, &h);
  len = h.len;
  kind = h.kind;
  if (h.nfds > MP_MAX_FDS || kind > MP_FRAME_VALUE || len > (uint64_t)SIZE_MAX / 2)
    return luaL_error(L, "corrupt message header");
  if (len > maxlen) {
    conn_release(c);       /* the stream cannot be resynchronized */
    return luaL_error(L, "message of %I bytes is longer than the %I allowed",
                      (lua_Integer)len, (lua_Integer)maxlen);
  }
  c->rpos += MP_FRAME_HDR;
  claim_fds(L, c, h.nfds, &fds);
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
  if (!as_value || kind == MP_FRAME_BYTES) {
    /* bytes: straight into a Lua string buffer */
    luaL_Buffer B;
    char *p;
    mp_fdlist_close(&fds);
    p = luaL_buffinitsize(L, &B, (size_t)len);
    r = readinto(L, c, p, (size_t)len, &have);
    if (r == MP_RAISED) return keep_partial(L, c, p, 0, have, (size_t)len, kind, &fds);
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
    if (r == MP_RAISED) {                    /* the payload's memory goes to c */
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
  double deadline = mp_deadline(t);
  /* forever (wait_readable leaves that wait to the read that follows) */
  int r = deadline < 0 && c->rlen == c->rpos && !c->eof ? poll_in(L, c, -1)
                                                        : wait_readable(L, c, deadline);
  if (r == MP_RAISED) return lua_error(L);
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
    {NULL, NULL}
  };
  static const luaL_Reg conn_meta[] = {
    {"__gc", conn__gc}, {"__close", conn__gc}, {"__tostring", conn__tostring},
    {"__mp_reduce", conn__reduce}, {NULL, NULL}
  };
  mp_newclass(L, MP_CONNECTION_T, (const luaL_Reg *const[]){ conn_methods, NULL },
              conn_meta, conn__index, "Connection_methods");
  lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
  lua_pushcfunction(L, conn_rebuild);
  mp_register_handle(L, "Connection");
}
