/*
 * queue.c: the Lua classes Queue, SimpleQueue and JoinableQueue (one
 * struct, mp_queue, three method sets) over one shared-memory segment per
 * queue: put, get, the other methods, handles. The segment, its lock and
 * journal are queue_ring.c's, the waits queue_wait.c's, the feeder thread
 * queue_feeder.c's (queue.h names them all).
 *
 * Items are codec messages (docs/design.md, decision 3): a boolean, a
 * number or a string goes through the codec's fast path (codec_scalar.c;
 * a string's bytes are copied once into the ring and once out of it,
 * straight into a Lua string when large), any other value through
 * mp_encode, before the lock is taken, so that an unserializable value
 * raises in put. An item whose message carries fds (it holds handles) is
 * a marked record whose fds go as a datagram of the queue's channel
 * (queue_chan.c): put_fds sends them, get receives them once it took the
 * record; plain items pay one compare of their first byte in get.
 * An unbounded put never blocks: beyond a few MiB queued,
 * items wait in the producer's feeder, so that the ring stays small and its
 * pages stay mapped and cached. maxsize bounds the number of items.
 *
 * A corrupt shared state raises ProcessError ("the queue's shared state is
 * corrupt"), never a read or write outside the mapping (queue_ring.c).
 *
 * Signals: get, a bounded put and join let a signal's Lua hook run before
 * each sleep (mp_interrupted), with nothing held and no sleeper announced;
 * the queue lock (held for one copy) is not interrupted.
 */
#include "queue.h"

#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define STACK_ITEM  8192                /* items copied out through the C stack */
#define KEEP_RBUF   (1u << 20)          /* largest read buffer kept between gets */
#define MAGIC       0x4d505131u         /* "MPQ1" */

/* queue kinds */
static const char *const kind_names[] = {"Queue", "SimpleQueue", "JoinableQueue", NULL};
static const char *const kind_classes[] = {MP_QUEUE_T, MP_SIMPLEQUEUE_T,
                                           MP_JOINABLEQUEUE_T};

/* Raise ProcessError for a corrupt shared state (the lock let go). */
static int q_corrupt(lua_State *L, const char *call, const char *what) {
  return mp_raise(L, "ProcessError", "%s: the queue's shared state is corrupt "
                  "(%s)", call, what);
}

/* ---- userdata ----------------------------------------------------- */

/* A queue of any of the three classes: a full userdata of our size with
   our magic (mp_tomagic: no registry look-up) */
static mp_queue *to_queue(lua_State *L, int i) {
  mp_queue *q = (mp_queue *)mp_tomagic(L, i, sizeof(mp_queue), QUEUE_MAGIC);
  if (__builtin_expect(q != NULL, 1)) return q;
  luaL_typeerror(L, i, "Queue");
  return NULL;
}

/* Set while get copies a large string out under a queue's lock: Lua code
   that runs then (a finalizer) must not wait for that lock. */
static int in_critical;

static mp_queue *check_queue(lua_State *L, int i) {
  mp_queue *q = to_queue(L, i);
  if (in_critical)
    luaL_error(L, "a queue cannot be used from a finalizer that runs during a get");
  if (q->shm == NULL) luaL_error(L, "%s is closed", kind_names[q->kind]);
  return q;
}

/* Release this process's view, after writing what waits in its feeder
   (mode: FEED_DRAIN for close, FEED_GROW for __gc, which never waits). */
static void queue_release(mp_queue *q, int mode) {
  if (q->shm != NULL) mpq_feeder_finish(q, mode);
  if (q->shm != NULL) {
    if (q->watching == mp_getpid())
      mp_atomic_fetch_sub(&q->shm->watchers, 1);
    mp_shm_unmap(q->shm, HDR_BYTES);
    q->shm = NULL;
  }
  if (q->ring != NULL) mp_shm_unmap(q->ring, q->mapcap);
  q->ring = NULL;
  q->mapcap = 0;
  if (q->fd >= 0) close(q->fd);
  if (q->efd >= 0) close(q->efd);
  if (q->afd >= 0) close(q->afd);
  if (q->bfd >= 0) close(q->bfd);
  q->fd = q->efd = q->afd = q->bfd = -1;
  q->watching = 0;
  free(q->rbuf);
  q->rbuf = NULL;
  q->rcap = 0;
}

static mp_queue *queue_push(lua_State *L, int kind) {
  mp_queue *q = (mp_queue *)lua_newuserdatauv(L, sizeof(mp_queue), 1);
  memset(q, 0, sizeof *q);
  q->magic = QUEUE_MAGIC;
  q->fd = q->efd = q->afd = q->bfd = -1;
  q->kind = kind;
  q->spin = SPIN_SECS;
  luaL_setmetatable(L, kind_classes[kind]);
  return q;
}

/* core.queue_new(maxsize, kind) -> Queue | SimpleQueue | JoinableQueue */
static int queue_new(lua_State *L) {
  lua_Integer maxsize = luaL_checkinteger(L, 1);
  int kind = luaL_checkoption(L, 2, "Queue", kind_names);
  mp_queue *q;
  void *p;
  int fd, err;
  luaL_argcheck(L, maxsize >= 0, 1, "maxsize must be >= 0");
  q = queue_push(L, kind);
  p = mp_shm_create(L, "multiprocessing-queue", HDR_BYTES, 1, &fd);
  q->shm = (qshm *)p;
  q->fd = fd;
  if ((err = mp_shm_grow(fd, HDR_BYTES + BASE_CAP)) != 0)
    return mp_raise_errno(L, err, "Queue: ftruncate");
  q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (q->efd < 0) return mp_raise_errno(L, errno, "Queue: eventfd");
  mpq_chan_new(L, q);
  q->shm->magic = MAGIC;
  q->shm->kind = (uint32_t)kind;
  q->shm->maxsize = (uint64_t)maxsize;
  q->shm->st.cap = BASE_CAP;
  return 1;
}

/* core.queue_from_fds(state, memfd, eventfd, chan_a, chan_b) -> queue
   (rebuilt handle; it owns the fds) */
static int queue_from_fds(lua_State *L) {
  int fd = (int)luaL_checkinteger(L, 2), efd = (int)luaL_checkinteger(L, 3);
  int afd = (int)luaL_optinteger(L, 4, -1), bfd = (int)luaL_optinteger(L, 5, -1);
  mp_queue *q;
  size_t size;
  const char *why;
  uint32_t kind;
  void *p;
  luaL_checktype(L, 1, LUA_TTABLE);
  q = queue_push(L, K_QUEUE);
  q->fd = fd;
  q->efd = efd;
  q->afd = afd;
  q->bfd = bfd;
  if ((why = mp_shm_check(fd, HDR_BYTES, &size)) != NULL)
    return mp_raise(L, "SerializationError", "cannot map a Queue from fd %d: %s",
                    fd, why);
  /* the channel's ends are optional here only so that q owns (and its
     __gc closes) the fds that did come when they are missing */
  if (afd < 0 || bfd < 0)
    return mp_raise(L, "SerializationError", "cannot map a Queue from fd %d: "
                    "its handle came without the descriptor channel's two fds", fd);
  if ((why = mpq_chan_check(afd, bfd)) != NULL)
    return mp_raise(L, "SerializationError", "cannot map a Queue from fd %d: %s",
                    fd, why);
  p = mmap(NULL, HDR_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return mp_raise_errno(L, errno, "Queue: mmap");
  q->shm = (qshm *)p;
  kind = q->shm->kind;
  if (q->shm->magic != MAGIC || kind > K_JOINABLE)
    return mp_raise(L, "SerializationError", "cannot map a Queue from fd %d: "
                    "not a queue segment", fd);
  q->kind = (int)kind;
  luaL_setmetatable(L, kind_classes[q->kind]);
  return 1;
}

/* ---- put ---------------------------------------------------------- */

/* Raise for a write that failed: a corrupt shared state, the errno of a
   ring that could not grow, or (negated) that of a datagram the feeder
   could not send. */
static int put_failed(lua_State *L, int err) {
  if (err == Q_CORRUPT) return q_corrupt(L, "Queue.put", "ring state");
  if (err < 0)
    return mp_raise_errno(L, -err, "Queue.put: an earlier item's descriptors "
                          "could not be sent (it was dropped)");
  return mp_raise_errno(L, err, "Queue.put: cannot grow the queue");
}

/* A bounded put that finds no room: "full" (put_nowait), "timeout" when
   the deadline passed (2: nil, reason pushed), else wait for room (0: try
   again). A signal's hook that raises while it waits: nothing is held,
   the item (if encoded) is in a boxed buffer. */
static int put_no_room(lua_State *L, mp_queue *q, double timeout, double deadline) {
  if (timeout == 0) return mp_reason(L, "full");
  if (deadline >= 0 && mp_now() >= deadline) return mp_reason(L, "timeout");
  if (mpq_wait(L, q, 0, deadline) < 0) return lua_error(L);
  return 0;
}

/* Take the lock and a copy of the state for a put (an empty ring starts
   over at 0): 1, or 0 with the lock let go when a bounded queue filled
   meanwhile (try again). */
static int put_lock(qshm *s, qstate *st) {
  mpq_lock(s);
  *st = s->st;
  if (s->maxsize != 0 && st->nitems >= s->maxsize) {
    mpq_unlock(s);
    return 0;
  }
  if (st->nitems == 0) st->head = st->tail = st->wrap = 0;
  return 1;
}

/* Write the item's record (head[0, hlen) then p[0, len)) with the lock
   held and st its state, let the lock go and wake a getter: true, or a
   raise for a write that failed. Inline: every put's own path. */
static inline __attribute__((always_inline)) int put_write(lua_State *L, mp_queue *q,
                                                           qstate *st, const char *head,
                                                           size_t hlen, const char *p,
                                                           size_t len) {
  qshm *s = q->shm;
  int wake = 0;
  int err = mpq_write(q, st, head, hlen, p, len, q->kind == K_JOINABLE, &wake);
  mpq_unlock(s);
  if (wake) mpq_wake(s, &s->not_empty, 1);
  if (err != 0) return put_failed(L, err);
  lua_pushboolean(L, 1);
  return 1;
}

/* An unbounded put that does not write now leaves the item (in the value
   at vi) to this process's feeder, with copies of its fds (NULL: none),
   since the caller may close its handles once put returns; a
   JoinableQueue counts it now, before a consumer can take it, as Python
   does: true. Inline: an unbounded put's path while its feeder is busy. */
static inline __attribute__((always_inline)) int put_feeder(lua_State *L, mp_queue *q,
                                                            const char *head, size_t hlen,
                                                            const char *p, size_t len,
                                                            int vi, const mp_fdlist *fds) {
  struct feeder *f = mpq_feeder_start(L, q);
  mp_fdlist own;
  own.n = 0;
  if (fds != NULL) {
    int err = mp_fdlist_dup(fds, &own);
    if (err != 0)
      return mp_raise_errno(L, err, "Queue.put: cannot keep the item's descriptors");
  }
  if (q->kind == K_JOINABLE) mpq_unfinished_add(q, 1);
  mpq_feeder_put(L, f, head, hlen, p, len, vi, &own);
  lua_pushboolean(L, 1);
  return 1;
}

/* A put of an item whose message p[0, len) (in the value at vi) carries
   fds: they go as a datagram of the channel, the record is marked
   (queue_chan.c); a full channel is waited for as a full bounded queue is,
   and an unbounded put leaves the item to the feeder instead. */
static int put_fds(lua_State *L, mp_queue *q, const char *p, size_t len,
                   mp_fdlist *fds, double timeout, int vi) {
  qshm *s = q->shm;
  uint64_t need = mpq_rec_size(MARK_LEN + (uint64_t)len);
  double deadline = mp_deadline(timeout);
  for (;;) {
    qstate st;
    char mark[MARK_LEN];
    int err;
    if (s->maxsize == 0) {
      int ferr;
      if (mpq_feeder_pending(L, q, &ferr)) {
        if (ferr != 0) return put_failed(L, ferr);
        break;                            /* behind this producer's others */
      }
      if (ferr != 0) return put_failed(L, ferr);
    } else if (!mpq_can_go(s, 0)) {
      int r = put_no_room(L, q, timeout, deadline);
      if (r) return r;
      continue;
    }
    if (!put_lock(s, &st)) continue;
    if (s->maxsize == 0 && st.nitems > 0 && mpq_used(&st) + need > SOFT_BYTES) {
      mpq_unlock(s);
      break;
    }
    err = mpq_chan_send(q, fds->fd, fds->n, mark, st.nitems == 0);
    if (err == EAGAIN) {                  /* the channel is full */
      mpq_unlock(s);
      if (s->maxsize == 0) break;         /* the feeder sends it later */
      if (timeout == 0) return mp_reason(L, "full");
      if (deadline >= 0 && mp_now() >= deadline) return mp_reason(L, "timeout");
      if (mp_interrupted(L)) return lua_error(L);
      mpq_chan_wait(q, deadline, 1.0);
      continue;
    }
    if (err != 0) {
      mpq_unlock(s);
      return mp_raise_errno(L, err, "Queue.put: cannot send the item's descriptors");
    }
    /* a write that fails leaves the datagram an orphan (dropped later) */
    return put_write(L, q, &st, mark, MARK_LEN, p, len);
  }
  return put_feeder(L, q, NULL, 0, p, len, vi, fds);
}

/* q:put(v [, timeout]), or q:put_nowait(v) (nowait 1) */
static int queue_put_t(lua_State *L, int nowait) {
  double timeout = nowait ? 0 : mp_opttimeout(L, 3);
  mp_queue *q;
  qshm *s;
  const char *p = NULL;        /* the item's message: head, then p */
  char head[MP_CODEC_SCALAR_MAX];
  size_t len = 0, hlen = 0;
  int vi = 2;                  /* the value that holds p */
  uint64_t need;
  double deadline;
  if (lua_gettop(L) > 3 - nowait)
    return luaL_error(L, nowait ? "put_nowait: too many arguments"
                                : "put: too many arguments");
  q = check_queue(L, 1);
  s = q->shm;
  switch (lua_type(L, 2)) {
    case LUA_TNIL: case LUA_TNONE:
      return luaL_argerror(L, 2, "nil is not a message");
    case LUA_TSTRING:          /* copied once, from the string to the ring */
      p = lua_tolstring(L, 2, &len);
      hlen = mp_encode_strhead(len, head);
      break;
    case LUA_TNUMBER: case LUA_TBOOLEAN:
      hlen = mp_encode_number_at(L, 2, head);
      break;
    default: {
      mp_buf *b = mp_buf_push(L, 0);       /* encode before locking: raises here */
      mp_fdlist fds;                       /* the fds of its handles (theirs) */
      fds.n = 0;
      mp_encode_named(L, 2, b, &fds, "item");
      if (fds.n > 0) {
        if ((uint64_t)b->len > MAX_ITEM)
          return luaL_argerror(L, 2, "item too large (more than 1 TiB)");
        return put_fds(L, q, b->data, b->len, &fds, timeout, lua_gettop(L));
      }
      p = b->data;
      len = b->len;
      vi = lua_gettop(L);
    }
  }
  if ((uint64_t)len > MAX_ITEM)
    return luaL_argerror(L, 2, "item too large (more than 1 TiB)");
  need = mpq_rec_size(hlen + len);
  deadline = mp_deadline(timeout);
  if (s->maxsize == 0) {
    int ferr, behind = mpq_feeder_pending(L, q, &ferr);   /* keep this
                                                            producer's order */
    if (ferr != 0) return put_failed(L, ferr);
    if (!behind) {
      qstate st;
      mpq_lock(s);
      st = s->st;
      if (st.nitems == 0) st.head = st.tail = st.wrap = 0;
      if (st.nitems == 0 || mpq_used(&st) + need <= SOFT_BYTES)
        return put_write(L, q, &st, head, hlen, p, len);
      mpq_unlock(s);
    }
    return put_feeder(L, q, head, hlen, p, len, vi, NULL);
  }
  for (;;) {
    qstate st;
    if (!mpq_can_go(s, 0)) {
      int r = put_no_room(L, q, timeout, deadline);
      if (r) return r;
      continue;
    }
    if (put_lock(s, &st)) return put_write(L, q, &st, head, hlen, p, len);
  }
}

/* q:put(v [, timeout]) -> true | nil, "full" | nil, "timeout" */
static int queue_put(lua_State *L) { return queue_put_t(L, 0); }

/* q:put_nowait(v) -> true | nil, "full" */
static int queue_put_nowait(lua_State *L) { return queue_put_t(L, 1); }

/* ---- get ---------------------------------------------------------- */

/* protected: push the string at (lightuserdata 1, length 2) */
static int push_lstring(lua_State *L) {
  lua_pushlstring(L, (const char *)lua_touserdata(L, 1),
                  (size_t)lua_tointeger(L, 2));
  return 1;
}

/* Copy a record's payload (len bytes) to this process's read buffer,
   under the lock (let go before a raise). */
static void copy_out(lua_State *L, mp_queue *q, const char *payload, uint64_t len) {
  if (q->rcap < len) {
    char *nb = (char *)realloc(q->rbuf, (size_t)len);
    if (nb == NULL) {
      mpq_unlock(q->shm);
      luaL_error(L, "Queue.get: not enough memory for a %I-byte item", (lua_Integer)len);
    }
    q->rbuf = nb;
    q->rcap = (size_t)len;
  }
  memcpy(q->rbuf, payload, (size_t)len);
}

/* Push the value of the message in the read buffer's bytes [skip, len),
   with fds (the decoder owns them). A box owns the buffer while decoding
   (which may raise or, through a handle's rebuild, run Lua code); a
   buffer of at most KEEP_RBUF bytes is kept for the next get. */
static void decode_rbuf(lua_State *L, mp_queue *q, uint64_t len, size_t skip,
                        mp_fdlist *fds) {
  mp_buf *b = mp_buf_push(L, 0);
  b->data = q->rbuf;
  b->cap = q->rcap;
  b->len = (size_t)len;
  q->rbuf = NULL;
  q->rcap = 0;
  mp_decode(L, b->data + skip, b->len - skip, fds, 0);
  if (q->shm != NULL && q->rbuf == NULL && b->cap <= KEEP_RBUF) {
    q->rbuf = b->data;
    q->rcap = b->cap;
    b->data = NULL;
    b->cap = b->len = 0;
  }
}

/* A get whose head record (payload, len; st the state) is marked: copy
   its message out, take the record and its fds from the channel, let the
   lock go, then decode it with them (the decoder owns them), or raise
   when they were lost. Kept out of queue_get_t (noinline), so that the
   plain path's frame and code stay as they were. */
static __attribute__((noinline)) int get_fds(lua_State *L, mp_queue *q,
                                             qstate *st, const char *payload,
                                             uint64_t len) {
  mpq_take ft;
  ft.ok = mpq_mark_parse(payload, len, &ft.id, &ft.nfds);
  ft.fds.n = 0;
  copy_out(L, q, payload, len);
  mpq_pop(q, st, len, &ft);             /* lets the lock go */
  if (!ft.ok) {
    mpq_unfinished_add(q, -1);          /* no task_done will come for it */
    return mp_raise(L, "SerializationError", "Queue.get: the item's "
                    "descriptors were lost (dropped the item): its producer died "
                    "between them and it, a datagram was forged, or this process "
                    "is at its open-file limit");
  }
  decode_rbuf(L, q, len, MARK_LEN, &ft.fds);
  return 1;
}

/* q:get([timeout]), or q:get_nowait() (nowait 1) */
static int queue_get_t(lua_State *L, int nowait) {
  double timeout = nowait ? 0 : mp_opttimeout(L, 2), deadline;
  mp_queue *q;
  qshm *s;
  char stackbuf[STACK_ITEM];
  if (lua_gettop(L) > 2 - nowait)
    return luaL_error(L, nowait ? "get_nowait: too many arguments"
                                : "get: too many arguments");
  q = check_queue(L, 1);
  s = q->shm;
  deadline = mp_deadline(timeout);
  lua_settop(L, 1);
  luaL_checkstack(L, 8, NULL);
  mpq_feeder_tidy(L, q);
  for (;;) {
    qstate st;
    const char *payload = NULL, *what = NULL;
    uint64_t len = 0;
    size_t off;
    int err, pushed = 0;
    if (mp_atomic_load(&s->st.nitems) == 0) {
      if (timeout == 0) return mp_reason(L, "empty");
      if (deadline >= 0 && mp_now() >= deadline) return mp_reason(L, "timeout");
      if (mpq_wait(L, q, 1, deadline) < 0) return lua_error(L);  /* nothing held */
      continue;
    }
    mpq_lock(s);
    st = s->st;
    if (st.nitems == 0) { mpq_unlock(s); continue; }
    if ((err = mpq_head(q, &st, &payload, &len, &what)) != 0) {
      mpq_unlock(s);
      if (err == Q_CORRUPT) return q_corrupt(L, "Queue.get", what);
      return mp_raise_errno(L, err, "Queue.get: mmap");
    }
    if (len > 0 && (unsigned char)payload[0] == MARK_BYTE)
      return get_fds(L, q, &st, payload, len);   /* an item with fds */
    if (len <= STACK_ITEM) {
      memcpy(stackbuf, payload, (size_t)len);
    } else if (mp_decode_strhead(payload, (size_t)len, &off)) {
      /* a string: its bytes straight into a Lua string (off and len, not
         the head, which others may rewrite, bound the copy), under the
         lock: protect the allocation (a memory error must not leave the
         lock held); a finalizer that the allocation runs may not use a
         queue meanwhile (see check_queue). Stopping the collector instead
         would reset its debt (LUA_GCRESTART) and let the heap grow
         without bound. */
      int status;
      lua_pushcfunction(L, push_lstring);
      lua_pushlightuserdata(L, (void *)(uintptr_t)(payload + off));
      lua_pushinteger(L, (lua_Integer)(len - off));
      in_critical = 1;
      status = lua_pcall(L, 2, 1, 0);
      in_critical = 0;
      if (status != LUA_OK) { mpq_unlock(s); return lua_error(L); }
      pushed = 1;
    } else {
      copy_out(L, q, payload, len);
    }
    mpq_pop(q, &st, len, NULL);          /* lets the lock go */
    if (pushed) return 1;
    if (len <= STACK_ITEM) {
      if (!mp_decode_scalar(L, stackbuf, (size_t)len)) {
        mp_fdlist none;
        none.n = 0;
        mp_decode(L, stackbuf, (size_t)len, &none, 0);
      }
    } else {
      mp_fdlist none;
      none.n = 0;
      decode_rbuf(L, q, len, 0, &none);
    }
    return 1;
  }
}

/* q:get([timeout]) -> v | nil, "empty" | nil, "timeout" */
static int queue_get(lua_State *L) { return queue_get_t(L, 0); }

/* q:get_nowait() -> v | nil, "empty" */
static int queue_get_nowait(lua_State *L) { return queue_get_t(L, 1); }

/* ---- state -------------------------------------------------------- */

/* q:qsize() -> number of items (approximate) */
static int queue_qsize(lua_State *L) {
  mp_queue *q = check_queue(L, 1);
  mpq_feeder_tidy(L, q);
  lua_pushinteger(L, (lua_Integer)mp_atomic_load(&q->shm->st.nitems));
  return 1;
}

/* q:empty() -> boolean (approximate) */
static int queue_empty(lua_State *L) {
  mp_queue *q = check_queue(L, 1);
  mpq_feeder_tidy(L, q);
  lua_pushboolean(L, mp_atomic_load(&q->shm->st.nitems) == 0);
  return 1;
}

/* q:full() -> boolean (approximate) */
static int queue_full(lua_State *L) {
  mp_queue *q = check_queue(L, 1);
  lua_pushboolean(L, !mpq_can_go(q->shm, 0));
  return 1;
}

/* q:fileno() -> fd, readable while the queue is not empty */
static int queue_fileno(lua_State *L) {
  mp_queue *q = check_queue(L, 1);
  qshm *s = q->shm;
  if (q->watching != mp_getpid()) {
    mpq_lock(s);
    mp_atomic_fetch_add(&s->watchers, 1);
    q->watching = mp_getpid();
    mpq_efd_clear(q->efd);
    if (s->st.nitems > 0) mpq_efd_set(q->efd);
    mpq_unlock(s);
  }
  lua_pushinteger(L, q->efd);
  return 1;
}

/* q:_ready() -> boolean: a get would not block now. When not, the eventfd
   is cleared, so a poller that woke for an item taken by another consumer
   sleeps again. */
static int queue__ready(lua_State *L) {
  mp_queue *q = check_queue(L, 1);
  qshm *s = q->shm;
  int ready = mp_atomic_load(&s->st.nitems) > 0;
  if (!ready && mp_atomic_load(&s->watchers) > 0) {
    mpq_lock(s);
    if (s->st.nitems == 0) mpq_efd_clear(q->efd);
    else ready = 1;
    mpq_unlock(s);
  }
  lua_pushboolean(L, ready);
  return 1;
}

/* q:close(): this process puts and gets no more. Items it put stay in
   the queue for the others; those still in its feeder are written first
   (waiting for room while consumers take items, see FEED_DRAIN). */
static int queue_close(lua_State *L) {
  queue_release(to_queue(L, 1), FEED_DRAIN);
  return 0;
}

/* q:join_thread(): every item this process put is in the queue already
   (there is no feeder buffer); raises, as Python, if the queue is open */
static int queue_join_thread(lua_State *L) {
  mp_queue *q = to_queue(L, 1);
  if (q->shm != NULL)
    return luaL_error(L, "join_thread: %s is not closed", kind_names[q->kind]);
  return 0;
}

/* q:cancel_join_thread(): items still in this process's feeder are
   dropped (not written) when the queue is closed or the process exits */
static int queue_cancel_join_thread(lua_State *L) {
  mpq_feeder_cancel(to_queue(L, 1));
  return 0;
}

/* ---- JoinableQueue ------------------------------------------------ */

/* q:task_done(): raises if called more times than items were put */
static int queue_task_done(lua_State *L) {
  mp_queue *q = check_queue(L, 1);
  qshm *s = q->shm;
  qstate st;
  mpq_lock(s);
  st = s->st;
  if (st.unfinished == 0) {
    mpq_unlock(s);
    return luaL_error(L, "task_done() called too many times");
  }
  st.unfinished--;
  mpq_commit(s, &st);
  mpq_unlock(s);
  if (st.unfinished == 0) mp_futex_wake(&s->st.unfinished, 0x7fffffff);
  return 0;
}

/* q:join([timeout]) -> true | nil, "timeout": every item put was task_done */
static int queue_join(lua_State *L) {
  mp_queue *q = check_queue(L, 1);
  double deadline = mp_deadline(mp_opttimeout(L, 2));
  qshm *s = q->shm;
  for (;;) {
    uint32_t v = mp_atomic_load(&s->st.unfinished);
    if (v == 0) {
      lua_pushboolean(L, 1);
      return 1;
    }
    if (deadline >= 0 && mp_now() >= deadline) break;
    if (mp_interrupted(L)) return lua_error(L);   /* before each sleep */
    mp_futex_wait(&s->st.unfinished, v, deadline);
  }
  return mp_reason(L, "timeout");
}

/* ---- metamethods -------------------------------------------------- */

static int queue__gc(lua_State *L) {
  /* a collection during a get's large copy holds that queue's lock: a
     feeder cannot be written then (it might be the same queue) */
  queue_release(to_queue(L, 1), in_critical ? FEED_NONE : FEED_GROW);
  return 0;
}

static int queue__tostring(lua_State *L) {
  mp_queue *q = to_queue(L, 1);
  if (q->shm == NULL)
    lua_pushfstring(L, "<%s(closed)>", kind_names[q->kind]);
  else if (q->shm->maxsize != 0)
    lua_pushfstring(L, "<%s(qsize=%I, maxsize=%I)>", kind_names[q->kind],
                    (lua_Integer)mp_atomic_load(&q->shm->st.nitems),
                    (lua_Integer)q->shm->maxsize);
  else
    lua_pushfstring(L, "<%s(qsize=%I)>", kind_names[q->kind],
                    (lua_Integer)mp_atomic_load(&q->shm->st.nitems));
  return 1;
}

/* __mp_reduce(q) -> "Queue", {kind}, memfd, eventfd, chan_a, chan_b */
static int queue__reduce(lua_State *L) {
  mp_queue *q = check_queue(L, 1);
  lua_pushliteral(L, "Queue");
  lua_createtable(L, 1, 0);
  lua_pushstring(L, kind_names[q->kind]);
  lua_rawseti(L, -2, 1);
  lua_pushinteger(L, q->fd);
  lua_pushinteger(L, q->efd);
  lua_pushinteger(L, q->afd);
  lua_pushinteger(L, q->bfd);
  return 6;
}

/* core._test.queue_crash(stage): see mpq_crash_stage (specs only) */
static int queue_test_crash(lua_State *L) {
  mpq_crash_stage = (int)luaL_checkinteger(L, 1);
  return 0;
}

/* core._test.queue_chan_send(q, bytes [, fd...]) -> true | nil, errno: send
   one datagram of any bytes, with the fds, on q's channel, as any process
   holding q can (specs only: forged datagrams) */
static int queue_test_chan_send(lua_State *L) {
  mp_queue *q = check_queue(L, 1);
  size_t n;
  const char *p = luaL_checklstring(L, 2, &n);
  int i, top = lua_gettop(L);
  union {
    char buf[CMSG_SPACE(sizeof(int) * 8)];
    struct cmsghdr align;
  } u;
  struct iovec iov;
  struct msghdr msg;
  luaL_argcheck(L, top - 2 <= 8, 3, "at most 8 fds");
  iov.iov_base = (void *)(uintptr_t)p;
  iov.iov_len = n;
  memset(&msg, 0, sizeof msg);
  memset(u.buf, 0, sizeof u.buf);
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (top > 2) {
    struct cmsghdr *cm;
    msg.msg_control = u.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)(top - 2));
    cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)(top - 2));
    for (i = 3; i <= top; i++) {
      int fd = (int)luaL_checkinteger(L, i);
      memcpy(CMSG_DATA(cm) + sizeof(int) * (size_t)(i - 3), &fd, sizeof fd);
    }
  }
  if (sendmsg(q->afd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
    lua_pushnil(L);
    lua_pushinteger(L, errno);
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* core._test.queue_chan_sndbuf(q, bytes): set the channel's send buffer
   (specs only: a channel that fills after a few items) */
static int queue_test_chan_sndbuf(lua_State *L) {
  mp_queue *q = check_queue(L, 1);
  int n = (int)luaL_checkinteger(L, 2);
  setsockopt(q->afd, SOL_SOCKET, SO_SNDBUF, &n, sizeof n);
  return 0;
}

/* core._test.queue_lock(q [, "held" | "reused"]): take the queue's lock
   and keep it (specs only: the caller is a child about to be killed). With
   "reused", the lock then names the caller's pid with another start time:
   an owner that died and whose pid this live process got. */
static int queue_test_lock(lua_State *L) {
  static const char *const modes[] = {"held", "reused", NULL};
  qshm *s = check_queue(L, 1)->shm;
  int reused = luaL_checkoption(L, 2, "held", modes) == 1;
  mpq_lock(s);
  if (reused) mp_lock_forge_reused(&s->lock);
  return 0;
}

/* q:_stats() -> table: ring capacity and state (for specs) */
static int queue__stats(lua_State *L) {
  mp_queue *q = check_queue(L, 1);
  qstate st = q->shm->st;
  lua_createtable(L, 0, 8);
  lua_pushinteger(L, (lua_Integer)st.cap);
  lua_setfield(L, -2, "cap");
  lua_pushinteger(L, (lua_Integer)st.nitems);
  lua_setfield(L, -2, "nitems");
  lua_pushinteger(L, (lua_Integer)mp_atomic_load(&q->shm->lock.owner));
  lua_setfield(L, -2, "lock");
  lua_pushinteger(L, __builtin_popcountll(mp_atomic_load(&q->shm->sleeping[W_GET])));
  lua_setfield(L, -2, "get_waiters");
  lua_pushinteger(L, __builtin_popcountll(mp_atomic_load(&q->shm->sleeping[W_PUT])));
  lua_setfield(L, -2, "put_waiters");
  lua_pushinteger(L, (lua_Integer)q->nspins);
  lua_setfield(L, -2, "spins");
  lua_pushinteger(L, (lua_Integer)q->nsleeps);
  lua_setfield(L, -2, "sleeps");
  lua_pushinteger(L, (lua_Integer)st.unfinished);
  lua_setfield(L, -2, "unfinished");
  return 1;
}

static const luaL_Reg simple_methods[] = {
  {"put", queue_put},
  {"get", queue_get},
  {"empty", queue_empty},
  {"close", queue_close},
  {"fileno", queue_fileno},
  {"_ready", queue__ready},
  {"_stats", queue__stats},
  {NULL, NULL}
};

static const luaL_Reg queue_methods[] = {
  {"put_nowait", queue_put_nowait},
  {"get_nowait", queue_get_nowait},
  {"qsize", queue_qsize},
  {"full", queue_full},
  {"join_thread", queue_join_thread},
  {"cancel_join_thread", queue_cancel_join_thread},
  {NULL, NULL}
};

static const luaL_Reg joinable_methods[] = {
  {"task_done", queue_task_done},
  {"join", queue_join},
  {NULL, NULL}
};

static const luaL_Reg queue_meta[] = {
  {"__gc", queue__gc},
  {"__close", queue_close},
  {"__tostring", queue__tostring},
  {"__mp_reduce", queue__reduce},
  {NULL, NULL}
};

MP_API void mp_queue_open(lua_State *L) {
  static const luaL_Reg tests[] = {
    {"queue_crash", queue_test_crash},
    {"queue_lock", queue_test_lock},
    {"queue_chan_send", queue_test_chan_send},
    {"queue_chan_sndbuf", queue_test_chan_sndbuf},
    {NULL, NULL}
  };
  static const luaL_Reg funcs[] = {
    {"queue_new", queue_new},
    {"queue_from_fds", queue_from_fds},
    {NULL, NULL}
  };
  mp_newclass(L, kind_classes[K_QUEUE],
              (const luaL_Reg *const[]){ simple_methods, queue_methods, NULL },
              queue_meta, NULL, "Queue_methods");
  lua_pop(L, 1);
  mp_newclass(L, kind_classes[K_SIMPLE], (const luaL_Reg *const[]){ simple_methods, NULL },
              queue_meta, NULL, "SimpleQueue_methods");
  lua_pop(L, 1);
  mp_newclass(L, kind_classes[K_JOINABLE],
              (const luaL_Reg *const[]){ simple_methods, queue_methods, joinable_methods, NULL },
              queue_meta, NULL, "JoinableQueue_methods");
  lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
  luaL_setfuncs(L, mpq_feeder_funcs, 0);
  lua_pushcfunction(L, queue_from_fds);   /* rebuild(state, memfd, eventfd,
                                             chan_a, chan_b) */
  mp_register_handle(L, "Queue");
  mp_add_tests(L, tests);
}
