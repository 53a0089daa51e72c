/*
 * pool_fds.c: the fds that ride with a pool channel's frames (pool.h,
 * "Handles"; docs/design.md, decision 1), for both of the pool's sides
 * (pool.c, the parent; pool_worker.c, the worker): the sender's queue of
 * fd copies per frame (pool_fdq), sent each group with its frame's first
 * byte (mp_pool_send); the receiver's FIFO of the fds read (pool_fifo),
 * which a frame claims as it is taken; and a value as a whole codec
 * message, the slow path of pool_put_value and pool_get_value, which says
 * which of its frame's fds its handles use. It calls neither side
 * (mp_pool_corrupt, the error both raise for a malformed frame, is here
 * too), so the pool's files call in one direction only.
 */
#include "pool.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

MP_API int mp_pool_corrupt(lua_State *L) {
  return luaL_error(L, "pool: corrupt message");
}

static pool_fdgrp *fdq_at(const pool_fdq *q, size_t i) {
  return (pool_fdgrp *)(void *)q->g.data + i;
}

static size_t fdq_end(const pool_fdq *q) {
  return q->g.len / sizeof(pool_fdgrp);
}

MP_API int mp_pool_fdq_add(lua_State *L, pool_fdq *q, size_t off, int fd) {
  size_t n = fdq_end(q);
  pool_fdgrp *g = n > q->head ? fdq_at(q, n - 1) : NULL;
  int k, d;
  if (g == NULL || g->off != off) {
    mp_buf_reserve(L, &q->g, sizeof(pool_fdgrp));
    g = fdq_at(q, n);
    g->off = off;
    g->orig.n = g->dup.n = 0;
    q->g.len += sizeof(pool_fdgrp);
  }
  for (k = 0; k < g->orig.n; k++)
    if (g->orig.fd[k] == fd) return k;
  if (g->orig.n >= MP_MAX_FDS)
    return mp_raise(L, "SerializationError", "more than %d file descriptors "
                    "in one pool message (use a smaller chunksize)", MP_MAX_FDS);
  d = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (d < 0) return mp_raise_errno(L, errno, "pool: dup");
  g->orig.fd[g->orig.n++] = fd;
  g->dup.fd[g->dup.n++] = d;
  return k;
}

MP_API uint32_t mp_pool_fdq_count(const pool_fdq *q, size_t off) {
  size_t n = fdq_end(q);
  if (n > q->head && fdq_at(q, n - 1)->off == off) return (uint32_t)fdq_at(q, n - 1)->dup.n;
  return 0;
}

MP_API void mp_pool_fdq_drop_from(pool_fdq *q, size_t from) {
  size_t n = fdq_end(q);
  while (n > q->head && fdq_at(q, n - 1)->off >= from) {
    mp_fdlist_close(&fdq_at(q, --n)->dup);
    q->g.len -= sizeof(pool_fdgrp);
  }
  if (n == q->head) q->g.len = q->head = 0;
}

MP_API void mp_pool_fdq_drop_before(pool_fdq *q, size_t to) {
  size_t n = fdq_end(q);
  while (q->head < n && fdq_at(q, q->head)->off < to)
    mp_fdlist_close(&fdq_at(q, q->head++)->dup);
  if (q->head == n) q->g.len = q->head = 0;
}

MP_API void mp_pool_fdq_shift(pool_fdq *q, size_t by) {
  size_t i, n = fdq_end(q);
  for (i = q->head; i < n; i++) fdq_at(q, i)->off -= by;
}

MP_API void mp_pool_fdq_free(pool_fdq *q) {
  mp_pool_fdq_drop_before(q, SIZE_MAX);
  mp_buf_free(&q->g);
  q->head = 0;
}

MP_API int mp_pool_send(int fd, mp_buf *b, size_t *pos, size_t end,
                        pool_fdq *q, int flags) {
  while (*pos < end) {
    size_t n = fdq_end(q), stop = end;
    pool_fdgrp *g = q->head < n ? fdq_at(q, q->head) : NULL;
    const mp_fdlist *fds = NULL;
    struct iovec iov;
    int one = 1, sent, e;
    if (g != NULL && g->off < *pos) {    /* cannot be: its frame went */
      mp_pool_fdq_drop_before(q, *pos);
      continue;
    }
    if (g != NULL && g->off == *pos) {   /* its fds ride from here */
      fds = &g->dup;
      if (q->head + 1 < n && fdq_at(q, q->head + 1)->off < stop)
        stop = fdq_at(q, q->head + 1)->off;
    } else if (g != NULL && g->off < stop) {
      stop = g->off;                     /* up to the next group's frame */
    }
    iov.iov_base = b->data + *pos;
    iov.iov_len = stop - *pos;
    e = mp_sendv(NULL, fd, &iov, &one, fds, flags, &sent);
    if (fds != NULL && sent) mp_pool_fdq_drop_before(q, *pos + 1);   /* they went */
    *pos = stop - (one ? iov.iov_len : 0);
    if (e != 0) return e;
  }
  return 0;
}

static int *fifo_at(const pool_fifo *ff, size_t i) {
  return (int *)(void *)ff->f.data + i;
}

static size_t fifo_end(const pool_fifo *ff) {
  return ff->f.len / sizeof(int);
}

MP_API ssize_t mp_pool_recv(lua_State *L, int fd, char *p, size_t len,
                            int flags, pool_fifo *ff) {
  mp_fdlist got;
  ssize_t r;
  int i, bad = 0;
  if (ff->f.cap - ff->f.len < sizeof(int) * MP_MAX_FDS) {
    if (ff->head > 0 && ff->head * 2 >= fifo_end(ff)) {   /* room at the front */
      memmove(ff->f.data, fifo_at(ff, ff->head), ff->f.len - ff->head * sizeof(int));
      ff->f.len -= ff->head * sizeof(int);
      ff->head = 0;
    }
    mp_buf_reserve(L, &ff->f, sizeof(int) * MP_MAX_FDS);
  }
  got.n = 0;
  r = mp_recv_fds(fd, p, len, flags, &got, &bad);
  if (r >= 0 && bad) ff->lost = 1;
  for (i = 0; i < got.n; i++) *fifo_at(ff, fifo_end(ff) + (size_t)i) = got.fd[i];
  ff->f.len += sizeof(int) * (size_t)got.n;
  return r;
}

MP_API void mp_pool_unclaim(pool_fifo *ff) {
  while (ff->claimed > 0) {
    close(*fifo_at(ff, ff->head++));
    ff->claimed--;
  }
  if (ff->head == fifo_end(ff)) ff->f.len = ff->head = 0;
}

MP_API void mp_pool_claim(lua_State *L, pool_fifo *ff, uint32_t nfds) {
  mp_pool_unclaim(ff);
  if (nfds == 0) return;
  if (nfds <= MP_MAX_FDS && nfds > fifo_end(ff) - ff->head && ff->lost)
    mp_raise_errno(L, EMFILE, "pool: a message's file descriptors were lost on "
                   "the way (this process is at its open-file limit?)");
  if (nfds > MP_MAX_FDS || nfds > fifo_end(ff) - ff->head) mp_pool_corrupt(L);
  ff->claimed = (int)nfds;
}

MP_API void mp_pool_fifo_free(pool_fifo *ff) {
  size_t i, n = fifo_end(ff);
  for (i = ff->head; i < n; i++) close(*fifo_at(ff, i));
  mp_buf_free(&ff->f);
  ff->head = 0;
  ff->claimed = 0;
}

MP_API void mp_pool_put_msg(lua_State *L, mp_buf *b, int idx, pool_fdq *q,
                            size_t off) {
  size_t at = b->len;
  mp_fdlist fds;
  int i;
  fds.n = 0;
  mp_buf_reserve(L, b, 5);
  b->data[at] = (char)POOL_MSG;
  b->len += 5;
  mp_encode(L, idx, b, q != NULL ? &fds : NULL);
  if (b->len - at - 5 > UINT32_MAX) luaL_error(L, "value too large for a pool message");
  pool_wr_u32(b->data + at + 1, (uint32_t)(b->len - at - 5));
  if (fds.n == 0) return;
  b->data[at] = (char)POOL_MSGFD;        /* its fds: their places in the frame's */
  mp_buf_reserve(L, b, 1 + (size_t)fds.n);
  b->data[b->len++] = (char)fds.n;
  for (i = 0; i < fds.n; i++)
    b->data[b->len++] = (char)mp_pool_fdq_add(L, q, off, fds.fd[i]);
}

MP_API const char *mp_pool_get_msg(lua_State *L, const char *p, const char *end,
                                   const pool_fifo *ff) {
  int fd = (unsigned char)*p == POOL_MSGFD;
  const char *msg;
  mp_fdlist fds, used;                   /* the value's copies of the frame's
                                            fds it uses */
  uint32_t n;
  int k, i, err;
  if (end - p < 5) return mp_pool_corrupt(L), NULL;
  n = pool_rd_u32(p + 1);
  p += 5;
  if ((size_t)(end - p) < n) return mp_pool_corrupt(L), NULL;
  msg = p;
  p += n;
  fds.n = 0;
  if (fd) {
    if (p >= end) return mp_pool_corrupt(L), NULL;
    k = (unsigned char)*p++;
    if (k == 0 || k > MP_MAX_FDS || end - p < k || ff == NULL)
      return mp_pool_corrupt(L), NULL;
    for (i = 0; i < k; i++) {
      if ((unsigned char)p[i] >= ff->claimed) return mp_pool_corrupt(L), NULL;
      used.fd[i] = *fifo_at(ff, ff->head + (unsigned char)p[i]);
    }
    used.n = k;
    if ((err = mp_fdlist_dup(&used, &fds)) != 0)
      return mp_raise_errno(L, err, "pool: dup"), NULL;
    p += k;
  }
  mp_decode(L, msg, n, &fds, ff != NULL ? ff->flags : 0);   /* owns them */
  return p;
}
