/*
 * pool.h: what the pool's two sides share (docs/design.md, decision 6):
 * pool.c, the parent's engine (PoolCore), and pool_worker.c, the worker's
 * loop and its handle (PoolWorker); the worker's side uses the parent's,
 * never the other way. Both use pool_fds.c, the fds in their frames.
 *
 * A channel carries frames (wire.c's 16-byte header; the kinds
 * MP_FRAME_DEF .. MP_FRAME_INITFAIL of mp.h). Payloads, u32 fields in the
 * host's byte order:
 *   DEF      u32 fnid, a codec message of the function
 *   TASK     u32 seq, u32 fnid, u32 n, n items: u32 argc, argc values,
 *            or u32 POOL_ARGS_ONE, one value: the table {args..., n=argc}
 *            (arguments that are not all plain: one message, so that a
 *            handle or table given twice is one in the task)
 *   CLEAR    forget the cached functions;  EXIT   leave the loop
 *   RESULT   u32 seq, u32 n, u32 microseconds, n items:
 *            u8 0, u32 count, count values | u8 1, the error value
 *   RETIRE   the worker leaves after this (memory limit)
 *   INITFAIL the error value (the initializer raised)
 * A value is a scalar by the codec's fast path (codec_scalar.h, inline
 * here), or anything else as a whole codec message (mp_encode), see
 * pool_put_value.
 *
 * Handles (docs/design.md, decision 1). A frame whose values hold handles
 * carries their fds: the header's nfds says how many, at most MP_MAX_FDS,
 * each fd once per frame however many of its values use it. They ride
 * with the frame's first byte (SCM_RIGHTS on one sendmsg that starts
 * exactly there), so that the receiver, which reads with recvmsg and
 * queues the fds that come in a FIFO per channel (pool_fifo), has them no
 * later than that byte: a stream socket never gives the fds of two sends
 * in one read, and gives them with the first byte of their send. Taking a
 * whole frame claims the first nfds fds of the FIFO; its values that hold
 * handles say which of them they use (POOL_MSGFD), and their decoding
 * takes copies (each value owns its handles' fds, as mp_decode wants);
 * the frame's fds are closed once its values are read or skipped. The
 * sender duplicates each fd when the frame is built (pool_fdq), since the
 * handle may be closed or collected before the frame is flushed, and
 * closes the copies once the kernel took the first byte.
 */
#ifndef MP_POOL_H
#define MP_POOL_H

#include "codec_scalar.h"

#include <string.h>

#define RBUF_INIT 65536                /* a channel buffer's first size */
#define POOL_ARGS_ONE 0xffffffffu      /* a TASK item's arguments as one value */

/* The fds to send with the frames of an output buffer: per frame that
   carries handles, its group of copies (pool_fds.c). The groups are in stream
   order, stored in g from index head on; orig are the fds as the values'
   handles gave them (a repeat in the frame reuses its copy). */
typedef struct pool_fdgrp {
  size_t off;                          /* its frame's first byte in the buffer */
  mp_fdlist orig, dup;
} pool_fdgrp;

typedef struct pool_fdq {
  mp_buf g;                            /* pool_fdgrp[] */
  size_t head;
} pool_fdq;

/* The fds read from a channel, in the order they came (ints in f from
   index head on); the first claimed belong to the frame taken last. */
typedef struct pool_fifo {
  mp_buf f;
  size_t head;
  int claimed;
  int lost;                            /* a read's fds were cut short (the
                                          process at its open-file limit) */
  int flags;                           /* mp_decode's: 0 (the two ends of a
                                          channel trust each other) but in
                                          the fuzzer (fuzz/fuzz_decode.c) */
} pool_fifo;

/* One worker's record in shared memory (a cache line each). */
typedef struct shslot {
  uint32_t started;                    /* seq of the chunk last started */
  uint32_t ready;                      /* initializer done */
  uint32_t finished;                   /* seq of the chunk last finished */
  uint32_t pad[13];
} shslot;

/* The parent's view of one worker slot. */
typedef struct slot {
  int fd;                              /* parent's end; -1 when none */
  int wfd;                             /* worker's end until the fork */
  int pidfd;                           /* sentinel in the epoll set (not ours) */
  int eof, dead, wantout, active;
  int building;                        /* a frame was being built: discard */
  int framed;                          /* chunks pc:tasks framed whole */
  int kind;                            /* the kind of the one being built */
  size_t frame_start;
  mp_buf out;
  size_t outpos;                       /* pending: out.data[outpos .. len) */
  mp_buf in;
  size_t inpos;                        /* unread: in.data[inpos .. len) */
  const char *cur, *curend;            /* items of the last RESULT frame */
  uint32_t curn;
  pool_fdq oq;                         /* fds of the frames in out */
  pool_fifo ff;                        /* fds read, the frame's claimed */
} slot;

#define POOL_MAGIC 0x4d50504f4f4cu     /* "MPPOOL": never a user address */

/* A PoolCore userdata (MP_POOL_T). */
typedef struct pcore {
  uint64_t magic;                      /* POOL_MAGIC: mp_pool_to's check */
  struct pcore *next, **prevp;         /* the live pools (pool.c) */
  int owner;                           /* pid of the process that made it */
  int n, closed;
  int epfd, tfd;
  int shmfd;                           /* the page's memfd (spawn, forkserver) */
  shslot *shm;
  size_t shmsize;
  slot s[];
} pcore;

/* Raise "pool: corrupt message" (pool_fds.c). */
MP_API int mp_pool_corrupt(lua_State *L);

static inline void pool_wr_u32(char *p, uint32_t v) { memcpy(p, &v, 4); }

static inline uint32_t pool_rd_u32(const char *p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}

/* Begin a frame at the end of b: its header's room; returns where it
   starts, for pool_frame_close once the payload is in. */
static inline size_t pool_frame_open(lua_State *L, mp_buf *b) {
  size_t at = b->len;
  mp_buf_reserve(L, b, MP_FRAME_HDR);
  b->len += MP_FRAME_HDR;
  return at;
}

static inline void pool_frame_close(mp_buf *b, size_t at, uint32_t kind,
                                    uint32_t nfds) {
  mp_frame_put(b->data + at, b->len - at - MP_FRAME_HDR, nfds, kind);
}

/* -- pool_fds.c: fds in frames (see the head of this file) ----------- */
/* Position in the frame at off's fd group of a copy of fd (made now, or
   the one made for a repeat); raises SerializationError past MP_MAX_FDS
   fds in one frame, OSError when fd cannot be duplicated. */
MP_API int mp_pool_fdq_add(lua_State *L, pool_fdq *q, size_t off, int fd);
/* Number of fds of the frame at off (0: none). */
MP_API uint32_t mp_pool_fdq_count(const pool_fdq *q, size_t off);
static inline uint32_t pool_fdq_count(const pool_fdq *q, size_t off) {
  return q->g.len == 0 ? 0 : mp_pool_fdq_count(q, off);   /* no call: no handles */
}
/* Close and forget the groups of frames at from and after (a frame that
   will not be sent) / before `to` (bytes that will not be sent). */
MP_API void mp_pool_fdq_drop_from(pool_fdq *q, size_t from);
MP_API void mp_pool_fdq_drop_before(pool_fdq *q, size_t to);
/* The buffer's first `by` bytes are gone (sent): offsets move down. */
MP_API void mp_pool_fdq_shift(pool_fdq *q, size_t by);
/* Close every copy and free the queue. */
MP_API void mp_pool_fdq_free(pool_fdq *q);
/* Send b->data[*pos .. end) on fd (flags: MSG_DONTWAIT or 0), each
   group's fds with its frame's first byte; *pos advances past what went.
   0 once all went, else an errno (EAGAIN: the socket is full). */
MP_API int mp_pool_send(int fd, mp_buf *b, size_t *pos, size_t end,
                        pool_fdq *q, int flags);
/* One recv of up to len bytes into p, the fds that came queued in ff (a
   raise, out of memory, comes before the read). */
MP_API ssize_t mp_pool_recv(lua_State *L, int fd, char *p, size_t len,
                            int flags, pool_fifo *ff);
/* Close the fds of the frame taken last; then claim the first nfds for
   the frame taken now (raises "pool: corrupt message" if fewer came). */
MP_API void mp_pool_unclaim(pool_fifo *ff);
MP_API void mp_pool_claim(lua_State *L, pool_fifo *ff, uint32_t nfds);
static inline void pool_unclaim(pool_fifo *ff) {
  if (ff->claimed > 0) mp_pool_unclaim(ff);   /* no call: no handles */
}
static inline void pool_claim(lua_State *L, pool_fifo *ff, uint32_t nfds) {
  if (nfds > 0 || ff->claimed > 0) mp_pool_claim(L, ff, nfds);
}
/* Are fds there that no frame claimed (with no bytes left: corrupt)? */
static inline int pool_fifo_unclaimed(const pool_fifo *ff) {
  return ff->f.len / sizeof(int) - ff->head > (size_t)ff->claimed;
}
/* Close every fd and free the FIFO. */
MP_API void mp_pool_fifo_free(pool_fifo *ff);
/* The slow paths of pool_put_value and pool_get_value: a value as a whole
   codec message, its fds added to q's group of the frame at off (q NULL:
   a handle raises); push the value of the message at p. */
MP_API void mp_pool_put_msg(lua_State *L, mp_buf *b, int idx, pool_fdq *q,
                            size_t off);
MP_API const char *mp_pool_get_msg(lua_State *L, const char *p, const char *end,
                                   const pool_fifo *ff);

/* A value in a task or result: a plain value (nil, boolean, number,
   string) is the codec's bytes of that value, its tag and payload
   (codec_scalar.h); anything else is POOL_MSG, a u32 length and a whole
   codec message (mp_encode), or, when it holds handles, POOL_MSGFD: the
   same, then u8 k and k u8 positions in the frame's fds, which are the
   message's fds in order. Neither is a codec tag. */
#define POOL_MSG 0x3f
#define POOL_MSGFD 0x3e

/* Append the value at idx, of type t (lua_type, or -1: not known yet)
   (the pool's hottest path: inline; an integer costs no lua_type); its
   handles' fds go to q's group of the frame at off (q NULL: a handle
   raises). */
static inline __attribute__((always_inline)) void pool_put_value(lua_State *L, mp_buf *b, int idx, int t,
                                                                 pool_fdq *q, size_t off) {
  if (idx < 0) idx = lua_absindex(L, idx);
  if (b->cap - b->len < 16) mp_buf_reserve(L, b, 16);   /* a number's room */
  if ((t == LUA_TNUMBER || t < 0) && lua_isinteger(L, idx)) {
    b->len += cs_wr_int((unsigned char *)b->data + b->len, lua_tointeger(L, idx));
    return;
  }
  if (t < 0) t = lua_type(L, idx);
  if (cs_put(L, b, idx, t)) return;
  mp_pool_put_msg(L, b, idx, q, off);   /* not a plain value: a message */
}

/* Push the value at p (< end); the position after it. Raises on a
   malformed one. A handle's fds are copies of the frame's claimed fds in
   ff (NULL: none). */
static inline __attribute__((always_inline)) const char *pool_get_value(lua_State *L, const char *p,
                                         const char *end, const pool_fifo *ff) {
  unsigned tag;
  if (p >= end) return mp_pool_corrupt(L), NULL;
  tag = (unsigned char)*p;
  if (tag >= T_FIXINT) {                 /* the commonest: a small integer */
    lua_pushinteger(L, (lua_Integer)(tag - T_FIXINT));
    return p + 1;
  }
  if (tag == T_INT && end - p > 10) {    /* the next: any other integer */
    uint64_t v;
    const unsigned char *q = cs_get_varint10((const unsigned char *)p + 1, &v);
    if (q == NULL) return mp_pool_corrupt(L), NULL;
    lua_pushinteger(L, cs_unzigzag(v));
    return (const char *)q;
  }
  if (tag == POOL_MSG || tag == POOL_MSGFD) return mp_pool_get_msg(L, p, end, ff);
  p = cs_get(L, p, end);
  if (p == NULL) return mp_pool_corrupt(L), NULL;
  return p;
}

/* -- pool.c --------------------------------------------------------- */
/* The PoolCore at i, open or not (a worker's inherited one is closed in
   part) / the slot whose number (1-based) is at
   i, raising for no such slot. */
MP_API pcore *mp_pool_to(lua_State *L, int i);
MP_API pcore *mp_pool_check(lua_State *L, int i);   /* raises when closed */
MP_API slot *mp_pool_slot(lua_State *L, pcore *pc, int i);
/* In slot me's forked worker: drop every other pool of this process and
   pc's fds but the worker's own channel end. */
MP_API void mp_pool_drop_inherited(pcore *pc, int me);


#endif
