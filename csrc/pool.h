/*
 * pool.h: what the pool's two sides share (docs/design.md, decision 6):
 * pool.c, the parent's engine (PoolCore), and pool_worker.c, the worker's
 * loop and its handle (PoolWorker); the worker's side uses the parent's,
 * never the other way.
 *
 * A channel carries frames (wire.c's 16-byte header, no fds; the kinds
 * MP_FRAME_DEF .. MP_FRAME_INITFAIL of mp.h). Payloads, u32 fields in the
 * host's byte order:
 *   DEF      u32 fnid, a codec message of the function
 *   TASK     u32 seq, u32 fnid, u32 n, n items: u32 argc, argc values
 *   CLEAR    forget the cached functions;  EXIT   leave the loop
 *   RESULT   u32 seq, u32 n, u32 microseconds, n items:
 *            u8 0, u32 count, count values | u8 1, the error value
 *   RETIRE   the worker leaves after this (memory limit)
 *   INITFAIL the error value (the initializer raised)
 * A value is u32 length, then a codec message: scalars by the codec's
 * fast path (codec_scalar.h, inline here), anything else by mp_encode
 * (no handles).
 */
#ifndef MP_POOL_H
#define MP_POOL_H

#include "codec_scalar.h"

#include <string.h>

#define RBUF_INIT 65536                /* a channel buffer's first size */

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
  int kind;                            /* the kind of the one being built */
  size_t frame_start;
  mp_buf out;
  size_t outpos;                       /* pending: out.data[outpos .. len) */
  mp_buf in;
  size_t inpos;                        /* unread: in.data[inpos .. len) */
  const char *cur, *curend;            /* items of the last RESULT frame */
  uint32_t curn;
} slot;

/* A PoolCore userdata (MP_POOL_T). */
typedef struct pcore {
  struct pcore *next, **prevp;         /* the live pools (pool.c) */
  int owner;                           /* pid of the process that made it */
  int n, closed;
  int epfd, tfd;
  int shmfd;                           /* the page's memfd (spawn, forkserver) */
  shslot *shm;
  size_t shmsize;
  slot s[];
} pcore;

/* Raise "pool: corrupt message" (pool.c). */
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

static inline void pool_frame_close(mp_buf *b, size_t at, uint32_t kind) {
  mp_frame_put(b->data + at, b->len - at - MP_FRAME_HDR, 0, kind);
}

/* A value in a task or result: a plain value (nil, boolean, number,
   string) is the codec's bytes of that value, its tag and payload
   (codec_scalar.h); anything else is POOL_MSG, a u32 length and a whole
   codec message (mp_encode). POOL_MSG is no codec tag. */
#define POOL_MSG 0x3f

/* Append the value at idx, of type t (lua_type, or -1: not known yet)
   (the pool's hottest path: inline; an integer costs no lua_type). */
static inline __attribute__((always_inline)) void pool_put_value(lua_State *L, mp_buf *b, int idx, int t) {
  size_t at;
  if (idx < 0) idx = lua_absindex(L, idx);
  if (b->cap - b->len < 16) mp_buf_reserve(L, b, 16);   /* a number's room */
  if ((t == LUA_TNUMBER || t < 0) && lua_isinteger(L, idx)) {
    b->len += cs_wr_int((unsigned char *)b->data + b->len, lua_tointeger(L, idx));
    return;
  }
  if (t < 0) t = lua_type(L, idx);
  if (cs_put(L, b, idx, t, 0)) return;
  at = b->len;                           /* not a plain value: a message */
  b->data[at] = (char)POOL_MSG;
  b->len += 5;
  mp_encode(L, idx, b, NULL);
  if (b->len - at - 5 > UINT32_MAX) luaL_error(L, "value too large for a pool message");
  pool_wr_u32(b->data + at + 1, (uint32_t)(b->len - at - 5));
}

/* Push the value at p (< end); the position after it. Raises on a
   malformed one. */
static inline __attribute__((always_inline)) const char *pool_get_value(lua_State *L, const char *p,
                                         const char *end) {
  unsigned tag;
  uint32_t n;
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
  if (tag == POOL_MSG) {
    if (end - p < 5) return mp_pool_corrupt(L), NULL;
    n = pool_rd_u32(p + 1);
    p += 5;
    if ((size_t)(end - p) < n) return mp_pool_corrupt(L), NULL;
    mp_decode(L, p, n, NULL, 0);
    return p + n;
  }
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
