/*
 * queue.c: Queue, SimpleQueue and JoinableQueue over one shared-memory
 * segment per queue.
 *
 * The segment is a memfd: a 4 KiB header (a lock, the ring's state, futex
 * words) followed by a byte ring that holds whole records (16-byte header,
 * then the payload, 8-aligned). A record never wraps: when it does not fit
 * at the end of the ring it goes to the start and the state remembers where
 * the first run of records ends (wrap). When no room is left the ring
 * grows: the memfd is made larger (ftruncate), the wrapped run is copied
 * behind the first one, and every process remaps (mremap) when it next
 * takes the lock and sees a new capacity. So an item of any size goes
 * through in one copy in and one copy out, memory grows only with what is
 * queued, and a ring that grew large goes back to its base size once
 * drained (its pages are given back with a hole punched in the memfd,
 * which is sealed against shrinking: see shm.c). maxsize bounds the number
 * of items. An unbounded put never
 * blocks: beyond a few MiB queued, items wait in the producer's feeder (a
 * helper thread, raw bytes only; see below), so that the ring stays small
 * and its pages stay mapped and cached.
 *
 * The lock is a futex word holding the owner's pid and a tag of its start
 * time. A waiter that sleeps too long checks whether the owner is still
 * alive (kill(pid, 0), zombie check and start time in /proc) and takes the
 * lock over if it died. Each change of the
 * ring's state is committed through a journal (copy the new state, mark
 * it valid, apply it, clear the mark) and every locker replays a valid
 * journal first, so a process killed at any point leaves either the old
 * state or the new one: a half-written item is never visible and its room
 * is reused, a consumer killed in get loses no item.
 *
 * Waits spin briefly on the item count (the other side is usually a few
 * microseconds away), then sleep on a sequence word that the other side
 * bumps only when someone announced a wait. Strings, numbers and booleans
 * are stored raw; other values go through the codec, encoded before the
 * lock is taken so that an unserializable value raises in put.
 *
 * Waitable: an eventfd made with the queue is readable while the queue is
 * not empty, maintained only while some process watches (q:fileno()).
 *
 * The header and the ring are written by every process that maps the
 * segment, so what they hold is untrusted: a state is checked (q_sane) and
 * a record's length and type against its run before any offset is used,
 * and the ring is mapped only as far as the segment reaches; a corrupt
 * value raises ProcessError ("the queue's shared state is corrupt"), never
 * a read or write outside the mapping. The checks are compares: no system
 * call is added to a put or a get.
 *
 * Signals: get, a bounded put and join let a signal's Lua hook run before
 * each sleep (mp_interrupted: lua5.4's Ctrl-C raises "interrupted!"),
 * with nothing held and no sleeper announced; the queue lock (held for
 * one copy) is not interrupted. The feeder thread blocks every signal, so
 * that signals reach the thread whose wait must see them.
 */
#include "mp.h"
#include "lock.h"

#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#define HDR_BYTES   4096                /* header page; the ring follows */
#define BASE_CAP    (256u * 1024)       /* ring bytes of a new queue */
#define SHRINK_CAP  (16u * 1024 * 1024)  /* a drained ring above this shrinks */
#define SOFT_BYTES  (4u * 1024 * 1024)  /* unbounded put: queued bytes above
                                           which items wait in the feeder */
#define INLINE_MAX  256                 /* feeder copies items this small */
#define REC_HDR     8                   /* a record: u64 length, payload */
#define STACK_ITEM  8192                /* items copied out through the C stack */
#define KEEP_RBUF   (1u << 20)          /* largest read buffer kept between gets */
#define POPULATE_MIN (4u << 20)        /* prefault copies this large */
#define MAX_ITEM    ((uint64_t)1 << 40)
#define MAX_CAP     ((uint64_t)1 << 48) /* beyond what q_reserve makes */
#define Q_CORRUPT   EBADMSG             /* a write's "errno" for a corrupt
                                           state (no call it makes sets it) */
#define SPIN_SECS   50e-6             /* longest spin before a futex sleep */
#define SPIN_PROBE  10e-6             /* spin of a probe after a failure */
#define NSLEEPERS   64                  /* processes announced asleep at once */
#define MAGIC       0x4d505131u         /* "MPQ1" */

/* what a sleeper waits for: an item, room (bounded put), room (feeder) */
enum { W_GET, W_PUT, W_FEED };

/* queue kinds */
enum { K_QUEUE, K_SIMPLE, K_JOINABLE };
static const char *const kind_names[] = {"Queue", "SimpleQueue", "JoinableQueue", NULL};
static const char *const kind_classes[] = {MP_QUEUE_T, MP_SIMPLEQUEUE_T,
                                           MP_JOINABLEQUEUE_T};

/* The ring's state; changed only under the lock, through the journal. */
typedef struct qstate {
  uint64_t cap;         /* ring bytes */
  uint64_t head, tail;  /* next record to read, next byte to write */
  uint64_t wrap;        /* 0, or the end of the first run: records are
                           [head, wrap) then [0, tail) */
  uint64_t nitems;
  uint32_t unfinished;  /* JoinableQueue: put minus task_done (futex word) */
  uint32_t pad;
} qstate;

typedef struct qshm {
  mp_lock lock;         /* the robust lock (lock.h) */
  qstate st;            /* committed state (at byte 24, beside the lock) */
  uint32_t jvalid;      /* the journal holds a state to apply */
  uint32_t magic, kind, pad0;
  uint64_t maxsize;     /* 0: unbounded */
  qstate jr;            /* journal */
  char pad1[64];
  uint32_t not_empty;   /* futex sequence words, bumped when waiters */
  uint32_t not_full;
  uint32_t watchers;    /* queue objects that called fileno() */
  uint32_t misses;      /* wakes that found nobody asleep */
  uint64_t ngets;       /* items taken so far (progress, for exit flushes) */
  uint64_t sleeping[3]; /* per W_* kind: bit i set while sleeper[i] sleeps */
  uint32_t sleeper[NSLEEPERS]; /* pid | kind << 30 of a sleeper, or 0 */
} qshm;

/* the header page holds it all */
typedef char qshm_fits_header[sizeof(qshm) <= HDR_BYTES ? 1 : -1];

/* A record: the length of its payload, a codec message (mp_encode's
   bytes; those of a boolean, a number or a string made by the codec's
   fast path, codec_scalar.c), then the payload, padded to 8 bytes. */
typedef struct rec {
  uint64_t len;
} rec;

typedef struct mp_queue {
  qshm *shm;            /* NULL when closed */
  char *ring;           /* ring mapping (mapcap bytes), NULL until first use */
  size_t mapcap;
  int fd, efd;          /* memfd, eventfd */
  int kind;
  int watching;         /* pid that counted this object in watchers, or 0 */
  char *rbuf;           /* read buffer for large encoded items */
  size_t rcap;
  struct feeder *feeder;/* this process's put-behind buffer, or NULL */
  double spin;          /* seconds a wait spins before it sleeps: 0 after a
                           spin failed (the other side is slow or not on a
                           CPU), until a probe succeeds again */
  unsigned probe;
  uint64_t nspins, nsleeps;  /* waits that ended spinning / asleep (stats) */
} mp_queue;

/* how a feeder's items get into the ring */
enum {
  FEED_NONE = -1,   /* drop them */
  FEED_GROW,        /* at once, growing the ring (__gc) */
  FEED_WAIT,        /* as room appears (the thread) */
  FEED_DRAIN        /* as room appears while consumers take items; at once
                       after DRAIN_IDLE seconds without a get (close, exit) */
};
#define DRAIN_IDLE 0.01
#define FEED_BATCH 64     /* items the thread writes under one lock */
static void feeder_finish(mp_queue *q, int mode);

/* ---- lock and journal --------------------------------------------- */

static void q_replay(qshm *s) {
  if (mp_atomic_load_acquire(&s->jvalid)) {
    s->st = s->jr;
    mp_atomic_store(&s->jvalid, 0);
  }
}

/* Take the queue's lock (waiting as long as it takes, never interrupted:
   it is held for one copy), then finish a commit that a holder killed
   inside it left in the journal. A dead holder's lock is taken over
   (lock.h); the journal makes that safe. */
static void q_lock(qshm *s) {
  mp_lock_acquire(&s->lock, mp_lock_self(), -1, NULL);
  q_replay(s);
}

static void q_unlock(qshm *s) {
  mp_lock_release(&s->lock);
}

/* Specs only: make the next put of this process die (_exit) after writing
   its item (1) or after writing the journal (2), holding the lock. */
static int crash_stage;

/* Make ns the state, so that a death at any point leaves old or new. */
static void q_commit(qshm *s, const qstate *ns) {
  if (crash_stage == 1) _exit(9);
  s->jr = *ns;
  mp_atomic_store(&s->jvalid, 1);
  if (crash_stage == 2) _exit(9);
  s->st = *ns;
  mp_atomic_store(&s->jvalid, 0);
}

/* Can st, a copy of the state read from shared memory, be followed without
   leaving a ring of st->cap bytes? (Whether the segment holds that many is
   q_remap's business.) */
static int q_sane(const qstate *st) {
  uint64_t cap = st->cap;
  if (cap < BASE_CAP || cap > MAX_CAP || (cap & (cap - 1)) != 0) return 0;
  if ((st->head | st->tail | st->wrap) & 7) return 0;   /* records are 8-aligned */
  if (st->wrap == 0) return st->head <= st->tail && st->tail <= cap;
  return st->tail <= st->head && st->head <= st->wrap && st->wrap <= cap;
}

/* Raise ProcessError for a corrupt shared state (the lock let go). */
static int q_corrupt(lua_State *L, const char *call, const char *what) {
  return mp_raise(L, "ProcessError", "%s: the queue's shared state is corrupt "
                  "(%s)", call, what);
}

/* Map the ring at capacity cap, from a state that passed q_sane (under the
   lock). 0, Q_CORRUPT when the segment does not reach that far (it is
   sealed against shrinking, so once it does it always will), or errno. */
static int q_remap(mp_queue *q, uint64_t cap64) {
  size_t cap = (size_t)cap64, have;
  void *p;
  int e;
  if (cap == q->mapcap && q->ring != NULL) return 0;
  if ((e = mp_shm_size(q->fd, &have)) != 0) return e;
  if (have < HDR_BYTES || cap > have - HDR_BYTES) return Q_CORRUPT;
  if (q->ring == NULL)
    p = mmap(NULL, cap, PROT_READ | PROT_WRITE, MAP_SHARED, q->fd, HDR_BYTES);
  else
    p = mremap(q->ring, q->mapcap, cap, MREMAP_MAYMOVE);
  if (p == MAP_FAILED) return errno;
  q->ring = (char *)p;
  q->mapcap = cap;
  return 0;
}

/* Fault in the pages of ring[off, off + len) in one call before a large
   copy (much cheaper than a fault per page); harmless where unsupported. */
static void q_populate(mp_queue *q, uint64_t off, uint64_t len, int write) {
#ifdef MADV_POPULATE_WRITE
  if (len >= POPULATE_MIN) {
    uintptr_t a = (uintptr_t)(q->ring + off), e = a + (uintptr_t)len;
    uintptr_t pg = 4096;
    a &= ~(pg - 1);
    madvise((void *)a, (size_t)(e - a),
            write ? MADV_POPULATE_WRITE : MADV_POPULATE_READ);
  }
#else
  (void)q; (void)off; (void)len; (void)write;
#endif
}

static uint64_t rec_size(uint64_t len) {
  return REC_HDR + ((len + 7) & ~(uint64_t)7);
}

static uint64_t q_used(const qstate *st) {
  return st->wrap ? st->wrap - st->head + st->tail : st->tail - st->head;
}

/* Find room for a record of n bytes in st (a copy of the state), growing
   the ring if needed; *off is where to write. Under the lock. 0 or errno. */
static int q_reserve(mp_queue *q, qstate *st, uint64_t n, uint64_t *off) {
  for (;;) {
    uint64_t used, cap;
    int err;
    if (st->wrap == 0) {
      if (st->tail + n <= st->cap) { *off = st->tail; st->tail += n; return 0; }
      if (n <= st->head) {                /* wrap to the start */
        st->wrap = st->tail;
        *off = 0;
        st->tail = n;
        return 0;
      }
    } else if (st->tail + n <= st->head) {
      *off = st->tail; st->tail += n; return 0;
    }
    /* grow: the wrapped run moves behind the first one */
    used = st->wrap ? st->wrap + st->tail : st->tail;
    cap = st->cap * 2;
    while (cap < used + n) {
      if (cap > ((uint64_t)1 << 46)) return ENOMEM;
      cap *= 2;
    }
    if ((err = mp_shm_grow(q->fd, (size_t)(HDR_BYTES + cap))) != 0) return err;
    {
      void *p = mremap(q->ring, q->mapcap, (size_t)cap, MREMAP_MAYMOVE);
      if (p == MAP_FAILED) return errno;
      q->ring = (char *)p;
      q->mapcap = (size_t)cap;
    }
    if (st->wrap) {
      memcpy(q->ring + st->wrap, q->ring, (size_t)st->tail);
      st->tail += st->wrap;
      st->wrap = 0;
    }
    st->cap = cap;
  }
}

/* ---- waiting ------------------------------------------------------ */

static int can_go(qshm *s, int for_get) {
  uint64_t n = mp_atomic_load(&s->st.nitems);
  return for_get ? n > 0 : (s->maxsize == 0 || n < s->maxsize);
}

/* Announce this process asleep as a waiter of kind k, in a slot that
   names its pid (so that a waiter killed in its sleep can be found).
   Returns the slot, or -1 when all are taken (the caller then sleeps in
   short slices, unannounced). */
static int sleeper_add(qshm *s, int k) {
  uint32_t me = (uint32_t)mp_getpid() | ((uint32_t)k << 30);
  int i;
  for (i = 0; i < NSLEEPERS; i++) {
    uint32_t z = 0;
    if (mp_atomic_load(&s->sleeper[i]) == 0 &&
        mp_atomic_cas(&s->sleeper[i], &z, me)) {
      mp_atomic_fetch_or(&s->sleeping[k], (uint64_t)1 << i);
      return i;
    }
  }
  return -1;
}

static void sleeper_del(qshm *s, int k, int i) {
  if (i < 0) return;
  mp_atomic_fetch_and(&s->sleeping[k], ~((uint64_t)1 << i));
  mp_atomic_store(&s->sleeper[i], 0);
}

/* Wake up to n sleepers on seq. A wake that finds nobody although someone
   was announced may mean a sleeper was killed: every 64th such miss, clear
   the slots of dead processes, so that nobody keeps waking for them. */
static void q_wake(qshm *s, uint32_t *seq, int n) {
  int i;
  if (mp_futex_wake(seq, n) > 0) return;
  if ((mp_atomic_add_fetch(&s->misses, 1) & 63) != 0) return;
  for (i = 0; i < NSLEEPERS; i++) {
    uint32_t v = mp_atomic_load(&s->sleeper[i]);
    if (v != 0 && (v >> 30) <= W_FEED &&
        mp_process_gone((int)(v & 0x3fffffffu), 0, 0)) {
      mp_atomic_fetch_and(&s->sleeping[v >> 30], ~((uint64_t)1 << i));
      mp_atomic_cas(&s->sleeper[i], &v, 0);
    }
  }
}

/* Sleep on seq (whose value was v) until woken or until; unannounced
   sleepers (slot -1) look again every millisecond. A signal ends the
   sleep early (EINTR): the caller looks again. */
static void q_sleep(uint32_t *seq, uint32_t v, int slot, double until) {
  if (slot < 0) {
    double soon = mp_now() + 1e-3;
    if (until < 0 || until > soon) until = soon;
  }
  mp_futex_wait(seq, v, until);
}

/* Wait until a get (for_get) or a put may succeed, or the deadline: spin
   a little, then announce ourselves and sleep on the sequence word. Before
   it sleeps, a signal's hook may raise (mp_interrupted): then it returns
   -1 with the error pushed, having announced nothing and holding nothing;
   else 0. */
static int q_wait(lua_State *L, mp_queue *q, int for_get, double deadline) {
  qshm *s = q->shm;
  uint32_t *seq = for_get ? &s->not_empty : &s->not_full;
  int kind = for_get ? W_GET : W_PUT, slot;
  uint32_t v;
  /* Spin only while spinning pays off; after a spin failed, probe with a
     short spin every 32nd wait (a busy machine: sleep at once, as on a
     pipe). */
  if (q->spin > 0 || (++q->probe & 31) == 0) {
    double start = mp_now(), budget = q->spin > 0 ? q->spin : SPIN_PROBE;
    int i;
    for (i = 1;; i++) {
      /* look at the shared line now and then only: every look takes it
         away from the writer */
      if ((i & 7) == 0 && can_go(s, for_get)) {
        q->spin = SPIN_SECS;
        q->nspins++;
        return 0;
      }
      if ((i & 255) == 0) {
        double now = mp_now();
        if (now - start >= budget) break;
        if (deadline >= 0 && now >= deadline) return 0;
      }
      mp_cpu_relax();
    }
    q->spin = 0;
  }
  if (mp_interrupted(L)) return -1;
  q->nsleeps++;
  slot = sleeper_add(s, kind);
  v = mp_atomic_load(seq);
  if (!can_go(s, for_get)) q_sleep(seq, v, slot, deadline);
  sleeper_del(s, kind, slot);
  return 0;
}

/* Bump the sequence word if someone sleeps on it; returns whether to wake. */
static int q_signal(uint32_t *seq, uint64_t *sleeping) {
  mp_atomic_fence();
  if (mp_atomic_load(sleeping) == 0) return 0;
  mp_atomic_fetch_add(seq, 1);
  return 1;
}

static void efd_set(int efd) {
  uint64_t one = 1;
  ssize_t r = write(efd, &one, sizeof one);
  (void)r;
}

static void efd_clear(int efd) {
  uint64_t v;
  ssize_t r = read(efd, &v, sizeof v);
  (void)r;
}

/* ---- userdata ----------------------------------------------------- */

static mp_queue *to_queue(lua_State *L, int i) {
  int k;
  for (k = 0; k < 3; k++) {
    mp_queue *q = (mp_queue *)luaL_testudata(L, i, kind_classes[k]);
    if (q != NULL) return q;
  }
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
  if (q->shm != NULL) feeder_finish(q, mode);
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
  q->fd = q->efd = -1;
  q->watching = 0;
  free(q->rbuf);
  q->rbuf = NULL;
  q->rcap = 0;
}

static mp_queue *queue_push(lua_State *L, int kind) {
  mp_queue *q = (mp_queue *)lua_newuserdatauv(L, sizeof(mp_queue), 1);
  memset(q, 0, sizeof *q);
  q->fd = q->efd = -1;
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
    return luaL_error(L, "Queue: ftruncate: %s", strerror(err));
  q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (q->efd < 0) return luaL_error(L, "Queue: eventfd: %s", strerror(errno));
  q->shm->magic = MAGIC;
  q->shm->kind = (uint32_t)kind;
  q->shm->maxsize = (uint64_t)maxsize;
  q->shm->st.cap = BASE_CAP;
  return 1;
}

/* core.queue_from_fds(state, memfd, eventfd) -> queue (rebuilt handle; it
   owns both fds) */
static int queue_from_fds(lua_State *L) {
  int fd = (int)luaL_checkinteger(L, 2), efd = (int)luaL_checkinteger(L, 3);
  mp_queue *q;
  size_t size;
  const char *why;
  uint32_t kind;
  void *p;
  luaL_checktype(L, 1, LUA_TTABLE);
  q = queue_push(L, K_QUEUE);
  q->fd = fd;
  q->efd = efd;
  if ((why = mp_shm_check(fd, HDR_BYTES, &size)) != NULL)
    return mp_raise(L, "SerializationError", "cannot map a Queue from fd %d: %s",
                    fd, why);
  p = mmap(NULL, HDR_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return luaL_error(L, "Queue: mmap: %s", strerror(errno));
  q->shm = (qshm *)p;
  kind = q->shm->kind;
  if (q->shm->magic != MAGIC || kind > K_JOINABLE)
    return mp_raise(L, "SerializationError", "cannot map a Queue from fd %d: "
                    "not a queue segment", fd);
  q->kind = (int)kind;
  luaL_setmetatable(L, kind_classes[q->kind]);
  return 1;
}

/* ---- writing a record ------------------------------------------- */

/* Append a record whose payload is h[0, hlen) then p[0, len) to the ring
   and commit it; under the lock, with st a copy of the state (reset when
   empty). Returns 0 or an errno (the ring could not grow); *wake tells
   whether to wake a sleeping consumer. */
static int q_write(mp_queue *q, qstate *st, const char *h, size_t hlen,
                   const char *p, uint64_t len, int count_task, int *wake) {
  qshm *s = q->shm;
  uint64_t need = rec_size(hlen + len), off = 0;
  rec *r;
  int err;
  if (!q_sane(st)) return Q_CORRUPT;
  if ((err = q_remap(q, st->cap)) != 0 || (err = q_reserve(q, st, need, &off)) != 0)
    return err;
  r = (rec *)(q->ring + off);
  r->len = hlen + len;
  q_populate(q, off, need, 1);
  if (hlen) memcpy(q->ring + off + REC_HDR, h, hlen);
  if (len) memcpy(q->ring + off + REC_HDR + hlen, p, (size_t)len);
  st->nitems++;
  if (count_task) st->unfinished++;
  q_commit(s, st);
  if (st->nitems == 1 && mp_atomic_load(&s->watchers) > 0) efd_set(q->efd);
  *wake = q_signal(&s->not_empty, &s->sleeping[W_GET]);
  return 0;
}

/* ---- the feeder ---------------------------------------------------- */

/* An unbounded put never waits. When more than SOFT_BYTES are queued, the
   item is not copied into fresh ring memory: it waits in this process's
   feeder (a reference to the Lua string or encoded buffer, kept alive in
   the queue's user value), and a helper thread moves it into the ring as
   consumers make room, as Python's feeder thread does. The thread copies
   raw bytes only and never touches the lua_State. Whatever is still in
   the feeder when the queue is closed or the process exits (exit hooks,
   atexit) is written as consumers make room, and at once (growing the
   ring) when none took an item for DRAIN_IDLE; __gc writes it at once.
   cancel_join_thread drops it instead. */

typedef struct pnode {
  struct pnode *next;
  const char *p;          /* the payload after head: in a kept Lua value,
                             or inl */
  uint64_t len;
  char head[MP_CODEC_SCALAR_MAX];  /* the payload's first bytes: a scalar's
                                      message or a string's head */
  size_t hlen;
  int ref;                /* slot in the keep table, or LUA_NOREF */
  int done;               /* in the ring (set by the thread) */
  char inl[1];            /* small payloads are copied here */
} pnode;

typedef struct feeder {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  pthread_t th;
  int started, stop, cancel;
  int pid;                /* the process that owns it */
  int error;              /* errno of a write that failed (ring growth) */
  mp_queue *q;
  pnode *head, *tail;     /* every node not yet released by the Lua side */
  pnode *next;            /* first node not yet in the ring */
  struct feeder *link;    /* all feeders of this process (atexit) */
} feeder;

static feeder *all_feeders;

/* Write v[0], then as many of v[1..cnt) as fit, into the ring (mode: see
   FEED_*); *written says how many. Returns 0, -1 when the thread is asked
   to stop, or an errno. */
static int feed_some(mp_queue *q, feeder *f, pnode **v, int cnt, int mode,
                     int *written) {
  qshm *s = q->shm;
  pnode *n = v[0];
  uint64_t seen = mp_atomic_load(&s->ngets);
  double idle_since = mp_now();
  for (;;) {
    qstate st;
    int err, wake = 0, i, slot;
    uint32_t seq;
    q_lock(s);
    st = s->st;
    if (st.nitems == 0) st.head = st.tail = st.wrap = 0;
    if (mode != FEED_GROW && st.nitems > 0 &&
        q_used(&st) + rec_size(n->hlen + n->len) > SOFT_BYTES) {
      if (mode == FEED_DRAIN) {
        uint64_t g = s->ngets;
        double now = mp_now();
        if (g != seen) { seen = g; idle_since = now; }
        if (now - idle_since >= DRAIN_IDLE) goto write;  /* nobody takes */
      }
      slot = sleeper_add(s, W_FEED);
      seq = mp_atomic_load(&s->not_full);
      q_unlock(s);
      q_sleep(&s->not_full, seq, slot,
              mp_now() + (mode == FEED_DRAIN ? DRAIN_IDLE / 4 : 0.02));
      sleeper_del(s, W_FEED, slot);
      if (mode == FEED_WAIT && mp_atomic_load_acquire(&f->stop))
        return -1;
      continue;
    }
  write:
    err = 0;
    for (i = 0; i < cnt; i++) {           /* as many as fit, in one go */
      int w = 0;
      n = v[i];
      if (i > 0 && mode != FEED_GROW &&
          q_used(&st) + rec_size(n->hlen + n->len) > SOFT_BYTES)
        break;
      if ((err = q_write(q, &st, n->head, n->hlen, n->p, n->len, 0, &w)) != 0)
        break;
      wake |= w;
    }
    *written = i;
    q_unlock(s);
    if (wake) q_wake(s, &s->not_empty, 1);
    return err;
  }
}

static void *feeder_main(void *arg) {
  feeder *f = (feeder *)arg;
  pthread_mutex_lock(&f->mu);
  for (;;) {
    pnode *v[FEED_BATCH], *n;
    int r, k = 0, written = 0, i;
    while (!f->stop && f->next == NULL) pthread_cond_wait(&f->cv, &f->mu);
    if (f->stop) break;
    for (n = f->next; n != NULL && k < FEED_BATCH; n = n->next) v[k++] = n;
    pthread_mutex_unlock(&f->mu);
    r = feed_some(f->q, f, v, k, FEED_WAIT, &written);
    pthread_mutex_lock(&f->mu);
    for (i = 0; i < written; i++) v[i]->done = 1;
    if (written > 0) f->next = v[written - 1]->next;
    if (r > 0) {
      f->error = r;                       /* put reports it; stop feeding */
      break;
    }
  }
  pthread_mutex_unlock(&f->mu);
  return NULL;
}

/* This process's feeder of q, or NULL (one inherited from the parent by
   fork belongs to the parent: forget it, never touch its mutex). */
static feeder *feeder_of(mp_queue *q) {
  feeder *f = q->feeder;
  if (f != NULL && f->pid != mp_getpid()) {
    q->feeder = NULL;
    return NULL;
  }
  return f;
}

/* Stop the thread and write what is left (unless cancelled or !flush),
   then free everything. Never raises; used by close, __gc and exits. */
static void feeder_finish(mp_queue *q, int mode) {
  feeder *f = feeder_of(q), **pp;
  pnode *n, *nx;
  if (f == NULL) { q->feeder = NULL; return; }
  if (f->started) {
    pthread_mutex_lock(&f->mu);
    mp_atomic_store(&f->stop, 1);
    pthread_cond_signal(&f->cv);
    pthread_mutex_unlock(&f->mu);
    pthread_join(f->th, NULL);
  }
  if (mode != FEED_NONE && !f->cancel && f->error == 0)
    for (n = f->next; n != NULL; n = n->next) {
      int written;
      if (feed_some(q, f, &n, 1, mode, &written) != 0) break;
    }
  for (n = f->head; n != NULL; n = nx) {
    nx = n->next;
    free(n);
  }
  for (pp = &all_feeders; *pp != NULL; pp = &(*pp)->link)
    if (*pp == f) { *pp = f->link; break; }
  pthread_cond_destroy(&f->cv);
  pthread_mutex_destroy(&f->mu);
  free(f);
  q->feeder = NULL;
}

/* atexit: flush the feeders of this process (os.exit skips __gc). */
static void feeders_atexit(void) {
  feeder *f = all_feeders, *nx;
  for (; f != NULL; f = nx) {
    nx = f->link;
    if (f->pid == mp_getpid()) feeder_finish(f->q, FEED_DRAIN);
  }
}

/* core.queue_flush_all(): flush every feeder of this process now (the
   exit hook of a child process) */
static int queue_flush_all(lua_State *L) {
  (void)L;
  feeders_atexit();
  return 0;
}

/* core.queue_set_exit_hook(fn): fn() is called once per process when its
   first feeder starts (queues.lua registers the flush as an exit hook) */
static int queue_set_exit_hook(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, "multiprocessing.queue_exit_hook");
  return 0;
}

/* Release the nodes the thread has written: drop their kept values. */
static void feeder_release(lua_State *L, mp_queue *q, feeder *f, int qi) {
  pnode *done = NULL, *n;
  pthread_mutex_lock(&f->mu);
  if (f->head != NULL && f->head->done) {
    done = f->head;
    for (n = done; n->next != NULL && n->next->done; n = n->next) {}
    f->head = n->next;
    if (f->head == NULL) f->tail = NULL;
    n->next = NULL;
  }
  pthread_mutex_unlock(&f->mu);
  if (done == NULL) return;
  lua_getiuservalue(L, qi, 1);            /* keep */
  for (n = done; n != NULL; n = done) {
    done = n->next;
    if (n->ref != LUA_NOREF && lua_istable(L, -1)) luaL_unref(L, -1, n->ref);
    free(n);
  }
  lua_pop(L, 1);
  (void)q;
}

/* Drop the kept values of items the feeder has written (any call on the
   queue does this, so that delivered items are not kept alive). */
static void feeder_tidy(lua_State *L, mp_queue *q) {
  feeder *f = q->feeder;
  if (f != NULL && f->pid == mp_getpid()) feeder_release(L, q, f, 1);
}

static int registered_atexit;
static int hook_pid;

/* Make (and start) this process's feeder of q. Raises on failure. */
static feeder *feeder_new(lua_State *L, mp_queue *q) {
  feeder *f = (feeder *)calloc(1, sizeof(feeder));
  sigset_t all, old;
  if (f == NULL) luaL_error(L, "Queue.put: not enough memory");
  pthread_mutex_init(&f->mu, NULL);
  pthread_cond_init(&f->cv, NULL);
  f->pid = mp_getpid();
  f->q = q;
  q->feeder = f;
  f->link = all_feeders;
  all_feeders = f;
  if (!registered_atexit) registered_atexit = atexit(feeders_atexit) == 0;
  lua_newtable(L);                        /* a fresh keep table */
  lua_setiuservalue(L, 1, 1);
  sigfillset(&all);    /* signals go to the Lua thread, whose waits see them */
  pthread_sigmask(SIG_BLOCK, &all, &old);
  f->started = pthread_create(&f->th, NULL, feeder_main, f) == 0;
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (!f->started) {
    feeder_finish(q, FEED_NONE);
    luaL_error(L, "Queue.put: cannot start the feeder thread");
  }
  if (hook_pid != mp_getpid()) {          /* flush at this process's exit */
    hook_pid = mp_getpid();
    if (lua_getfield(L, LUA_REGISTRYINDEX, "multiprocessing.queue_exit_hook")
        == LUA_TFUNCTION)
      lua_call(L, 0, 0);
    else
      lua_pop(L, 1);
  }
  return f;
}

/* Queue the item h[0, hlen) then p[0, len) behind the others of this
   process; p is in the value at stack index vi, kept alive meanwhile. */
static void feeder_put(lua_State *L, mp_queue *q, feeder *f, const char *h,
                       size_t hlen, const char *p, uint64_t len, int vi) {
  int small = len <= INLINE_MAX;
  pnode *n = (pnode *)malloc(sizeof(pnode) + (small ? (size_t)len : 0));
  if (n == NULL) luaL_error(L, "Queue.put: not enough memory");
  n->next = NULL;
  n->len = len;
  memcpy(n->head, h, hlen);
  n->hlen = hlen;
  n->done = 0;
  n->ref = LUA_NOREF;
  if (small) {
    if (len) memcpy(n->inl, p, (size_t)len);
    n->p = n->inl;
  } else {
    n->p = p;
    lua_getiuservalue(L, 1, 1);           /* keep */
    lua_pushvalue(L, vi);
    n->ref = luaL_ref(L, -2);             /* may raise: n is not linked yet */
    lua_pop(L, 1);
  }
  (void)q;
  pthread_mutex_lock(&f->mu);
  if (f->tail) f->tail->next = n; else f->head = n;
  f->tail = n;
  if (f->next == NULL) f->next = n;
  pthread_cond_signal(&f->cv);
  pthread_mutex_unlock(&f->mu);
}

/* ---- put ---------------------------------------------------------- */

/* Raise for a write that failed: a corrupt shared state, or the errno of a
   ring that could not grow. */
static int put_failed(lua_State *L, int err) {
  if (err == Q_CORRUPT) return q_corrupt(L, "Queue.put", "ring state");
  return luaL_error(L, "Queue.put: cannot grow the queue: %s", strerror(err));
}

static int queue_put_t(lua_State *L, double timeout) {
  mp_queue *q = check_queue(L, 1);
  qshm *s = q->shm;
  const char *p = NULL;        /* the item's message: head, then p */
  char head[MP_CODEC_SCALAR_MAX];
  size_t len = 0, hlen = 0;
  int vi = 2;                  /* the value that holds p */
  uint64_t need;
  double deadline;
  switch (lua_type(L, 2)) {
    case LUA_TNIL: case LUA_TNONE:
      return luaL_argerror(L, 2, "nil is not a message");
    case LUA_TSTRING:          /* copied once, from the string to the ring */
      p = lua_tolstring(L, 2, &len);
      hlen = mp_encode_strhead(len, head);
      break;
    case LUA_TNUMBER: case LUA_TBOOLEAN:
      hlen = mp_encode_scalar(L, 2, head);
      break;
    default: {
      mp_buf *b = mp_buf_push(L, 0);       /* encode before locking: raises here */
      mp_encode_named(L, 2, b, NULL, "item");
      p = b->data;
      len = b->len;
      vi = lua_gettop(L);
    }
  }
  if ((uint64_t)len > MAX_ITEM)
    return luaL_argerror(L, 2, "item too large (more than 1 TiB)");
  need = rec_size(hlen + len);
  deadline = mp_deadline(timeout);
  if (s->maxsize == 0) {
    feeder *f = feeder_of(q);
    int behind = 0;
    if (f != NULL) {
      int ferr;
      feeder_release(L, q, f, 1);
      pthread_mutex_lock(&f->mu);
      behind = f->next != NULL;           /* keep this producer's order */
      ferr = f->error;
      pthread_mutex_unlock(&f->mu);
      if (ferr != 0) return put_failed(L, ferr);
    }
    if (!behind) {
      qstate st;
      int err, wake = 0;
      q_lock(s);
      st = s->st;
      if (st.nitems == 0) st.head = st.tail = st.wrap = 0;
      if (st.nitems == 0 || q_used(&st) + need <= SOFT_BYTES) {
        err = q_write(q, &st, head, hlen, p, len, q->kind == K_JOINABLE, &wake);
        q_unlock(s);
        if (wake) q_wake(s, &s->not_empty, 1);
        if (err != 0) return put_failed(L, err);
        lua_pushboolean(L, 1);
        return 1;
      }
      q_unlock(s);
    }
    if (f == NULL) f = feeder_new(L, q);
    if (q->kind == K_JOINABLE) {          /* counted now, as Python does */
      qstate st;
      q_lock(s);
      st = s->st;
      st.unfinished++;
      q_commit(s, &st);
      q_unlock(s);
    }
    feeder_put(L, q, f, head, hlen, p, len, vi);
    lua_pushboolean(L, 1);
    return 1;
  }
  for (;;) {
    qstate st;
    int err, wake_get = 0;
    if (!can_go(s, 0)) {
      if (timeout == 0) goto full;
      if (deadline >= 0 && mp_now() >= deadline) goto timedout;
      /* a signal's hook that raises: nothing is held, the item (if
         encoded) is in a boxed buffer */
      if (q_wait(L, q, 0, deadline) < 0) return lua_error(L);
      continue;
    }
    q_lock(s);
    st = s->st;
    if (s->maxsize != 0 && st.nitems >= s->maxsize) { q_unlock(s); continue; }
    if (st.nitems == 0) st.head = st.tail = st.wrap = 0;
    err = q_write(q, &st, head, hlen, p, len, q->kind == K_JOINABLE, &wake_get);
    q_unlock(s);
    if (err != 0) return put_failed(L, err);
    if (wake_get) q_wake(s, &s->not_empty, 1);
    lua_pushboolean(L, 1);
    return 1;
  }
full:
  lua_pushnil(L);
  lua_pushliteral(L, "full");
  return 2;
timedout:
  lua_pushnil(L);
  lua_pushliteral(L, "timeout");
  return 2;
}

/* q:put(v [, timeout]) -> true | nil, "full" | nil, "timeout" */
static int queue_put(lua_State *L) {
  double timeout = mp_opttimeout(L, 3);
  if (lua_gettop(L) > 3) return luaL_error(L, "put: too many arguments");
  return queue_put_t(L, timeout);
}

/* q:put_nowait(v) -> true | nil, "full" */
static int queue_put_nowait(lua_State *L) {
  if (lua_gettop(L) > 2) return luaL_error(L, "put_nowait: too many arguments");
  return queue_put_t(L, 0);
}

/* ---- get ---------------------------------------------------------- */

/* protected: push the string at (lightuserdata 1, length 2) */
static int push_lstring(lua_State *L) {
  lua_pushlstring(L, (const char *)lua_touserdata(L, 1),
                  (size_t)lua_tointeger(L, 2));
  return 1;
}

static int queue_get_t(lua_State *L, double timeout) {
  mp_queue *q = check_queue(L, 1);
  qshm *s = q->shm;
  char stackbuf[STACK_ITEM];
  double deadline = mp_deadline(timeout);
  lua_settop(L, 1);
  luaL_checkstack(L, 8, NULL);
  feeder_tidy(L, q);
  for (;;) {
    qstate st;
    rec *r;
    const char *payload;
    uint64_t len, run, oldcap;
    size_t off;
    int err, wake_put, wake_get, shrink = 0, pushed = 0;
    if (mp_atomic_load(&s->st.nitems) == 0) {
      if (timeout == 0) goto empty;
      if (deadline >= 0 && mp_now() >= deadline) goto timedout;
      if (q_wait(L, q, 1, deadline) < 0) return lua_error(L);  /* nothing held */
      continue;
    }
    q_lock(s);
    st = s->st;
    if (st.nitems == 0) { q_unlock(s); continue; }
    if (!q_sane(&st)) {
      q_unlock(s);
      return q_corrupt(L, "Queue.get", "ring state");
    }
    if ((err = q_remap(q, st.cap)) != 0) {
      q_unlock(s);
      if (err == Q_CORRUPT) return q_corrupt(L, "Queue.get", "ring beyond the segment");
      return luaL_error(L, "Queue.get: mmap: %s", strerror(err));
    }
    /* the record must lie in its run: [head, wrap) or [head, tail) */
    run = (st.wrap ? st.wrap : st.tail) - st.head;
    if (run < REC_HDR) {
      q_unlock(s);
      return q_corrupt(L, "Queue.get", "no record where one should be");
    }
    r = (rec *)(q->ring + st.head);
    len = r->len;                         /* read once */
    if (len > run - REC_HDR || rec_size(len) > run) {
      q_unlock(s);
      return q_corrupt(L, "Queue.get", "bad record");
    }
    payload = q->ring + st.head + REC_HDR;
    q_populate(q, st.head, rec_size(len), 0);
    if (len <= STACK_ITEM) {
      memcpy(stackbuf, payload, (size_t)len);
    } else if (mp_decode_strhead(payload, (size_t)len, &off)) {
      /* a string: its bytes straight into a Lua string (off and len, not
         the head, which others may rewrite, bound the copy), under the
         lock: protect the allocation
         (a memory error must not leave the lock held); a finalizer that
         the allocation runs may not use a queue meanwhile (see
         check_queue). Stopping the collector instead would reset its debt
         (LUA_GCRESTART) and let the heap grow without bound. */
      int status;
      lua_pushcfunction(L, push_lstring);
      lua_pushlightuserdata(L, (void *)(uintptr_t)(payload + off));
      lua_pushinteger(L, (lua_Integer)(len - off));
      in_critical = 1;
      status = lua_pcall(L, 2, 1, 0);
      in_critical = 0;
      if (status != LUA_OK) { q_unlock(s); return lua_error(L); }
      pushed = 1;
    } else {
      if (q->rcap < len) {
        char *nb = (char *)realloc(q->rbuf, (size_t)len);
        if (nb == NULL) {
          q_unlock(s);
          return luaL_error(L, "Queue.get: not enough memory for a %I-byte item",
                            (lua_Integer)len);
        }
        q->rbuf = nb;
        q->rcap = (size_t)len;
      }
      memcpy(q->rbuf, payload, (size_t)len);
    }
    st.head += rec_size(len);
    st.nitems--;
    s->ngets++;
    if (st.wrap != 0 && st.head == st.wrap) st.head = st.wrap = 0;
    oldcap = st.cap;
    if (st.nitems == 0) {
      st.head = st.tail = st.wrap = 0;
      if (st.cap > SHRINK_CAP) { st.cap = BASE_CAP; shrink = 1; }
    }
    q_commit(s, &st);
    if (shrink) {
      /* the segment cannot shrink (sealed): give back the pages of the
         ring beyond its base size instead; the size stays for a regrowth */
      fallocate(q->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                (off_t)(HDR_BYTES + BASE_CAP), (off_t)(oldcap - BASE_CAP));
      q_remap(q, BASE_CAP);
    }
    if (st.nitems == 0 && mp_atomic_load(&s->watchers) > 0) efd_clear(q->efd);
    wake_put = q_signal(&s->not_full, &s->sleeping[W_PUT]);
    /* feeders wait for room; wake them when half of it is free, so that
       they write in batches rather than one item per get */
    if (q_used(&st) <= SOFT_BYTES / 2 &&
        q_signal(&s->not_full, &s->sleeping[W_FEED]))
      wake_put = 2;
    /* pass the word on if more items wait and more consumers sleep */
    wake_get = st.nitems > 0 && q_signal(&s->not_empty, &s->sleeping[W_GET]);
    q_unlock(s);
    if (wake_put) q_wake(s, &s->not_full, wake_put == 2 ? 0x7fffffff : 1);
    if (wake_get) q_wake(s, &s->not_empty, 1);
    if (pushed) return 1;
    if (len <= STACK_ITEM) {
      if (!mp_decode_scalar(L, stackbuf, (size_t)len)) {
        mp_fdlist none;
        none.n = 0;
        mp_decode(L, stackbuf, (size_t)len, &none, 0);
      }
    } else {
      /* the box owns the read buffer while decoding (which may raise or,
         through a handle's rebuild, run Lua code) */
      mp_fdlist none;
      mp_buf *b = mp_buf_push(L, 0);
      none.n = 0;
      b->data = q->rbuf;
      b->cap = q->rcap;
      b->len = (size_t)len;
      q->rbuf = NULL;
      q->rcap = 0;
      mp_decode(L, b->data, b->len, &none, 0);
      if (q->shm != NULL && q->rbuf == NULL && b->cap <= KEEP_RBUF) {
        q->rbuf = b->data;
        q->rcap = b->cap;
        b->data = NULL;
        b->cap = b->len = 0;
      }
    }
    return 1;
  }
empty:
  lua_pushnil(L);
  lua_pushliteral(L, "empty");
  return 2;
timedout:
  lua_pushnil(L);
  lua_pushliteral(L, "timeout");
  return 2;
}

/* q:get([timeout]) -> v | nil, "empty" | nil, "timeout" */
static int queue_get(lua_State *L) {
  double timeout = mp_opttimeout(L, 2);
  if (lua_gettop(L) > 2) return luaL_error(L, "get: too many arguments");
  return queue_get_t(L, timeout);
}

/* q:get_nowait() -> v | nil, "empty" */
static int queue_get_nowait(lua_State *L) {
  if (lua_gettop(L) > 1) return luaL_error(L, "get_nowait: too many arguments");
  return queue_get_t(L, 0);
}

/* ---- state -------------------------------------------------------- */

/* q:qsize() -> number of items (approximate) */
static int queue_qsize(lua_State *L) {
  mp_queue *q = check_queue(L, 1);
  feeder_tidy(L, q);
  lua_pushinteger(L, (lua_Integer)mp_atomic_load(&q->shm->st.nitems));
  return 1;
}

/* q:empty() -> boolean (approximate) */
static int queue_empty(lua_State *L) {
  mp_queue *q = check_queue(L, 1);
  feeder_tidy(L, q);
  lua_pushboolean(L, mp_atomic_load(&q->shm->st.nitems) == 0);
  return 1;
}

/* q:full() -> boolean (approximate) */
static int queue_full(lua_State *L) {
  mp_queue *q = check_queue(L, 1);
  lua_pushboolean(L, !can_go(q->shm, 0));
  return 1;
}

/* q:fileno() -> fd, readable while the queue is not empty */
static int queue_fileno(lua_State *L) {
  mp_queue *q = check_queue(L, 1);
  qshm *s = q->shm;
  if (q->watching != mp_getpid()) {
    q_lock(s);
    mp_atomic_fetch_add(&s->watchers, 1);
    q->watching = mp_getpid();
    efd_clear(q->efd);
    if (s->st.nitems > 0) efd_set(q->efd);
    q_unlock(s);
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
    q_lock(s);
    if (s->st.nitems == 0) efd_clear(q->efd);
    else ready = 1;
    q_unlock(s);
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
  mp_queue *q = to_queue(L, 1);
  feeder *f = q->shm != NULL ? feeder_of(q) : NULL;
  if (f != NULL) f->cancel = 1;
  return 0;
}

/* ---- JoinableQueue ------------------------------------------------ */

/* q:task_done(): raises if called more times than items were put */
static int queue_task_done(lua_State *L) {
  mp_queue *q = check_queue(L, 1);
  qshm *s = q->shm;
  qstate st;
  q_lock(s);
  st = s->st;
  if (st.unfinished == 0) {
    q_unlock(s);
    return luaL_error(L, "task_done() called too many times");
  }
  st.unfinished--;
  q_commit(s, &st);
  q_unlock(s);
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
  lua_pushnil(L);
  lua_pushliteral(L, "timeout");
  return 2;
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

/* __mp_reduce(q) -> "Queue", {kind}, memfd, eventfd */
static int queue__reduce(lua_State *L) {
  mp_queue *q = check_queue(L, 1);
  lua_pushliteral(L, "Queue");
  lua_createtable(L, 1, 0);
  lua_pushstring(L, kind_names[q->kind]);
  lua_rawseti(L, -2, 1);
  lua_pushinteger(L, q->fd);
  lua_pushinteger(L, q->efd);
  return 4;
}

/* core._test.queue_crash(stage): see crash_stage (specs only) */
static int queue_test_crash(lua_State *L) {
  crash_stage = (int)luaL_checkinteger(L, 1);
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
  q_lock(s);
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
    {NULL, NULL}
  };
  static const luaL_Reg funcs[] = {
    {"queue_new", queue_new},
    {"queue_from_fds", queue_from_fds},
    {"queue_flush_all", queue_flush_all},
    {"queue_set_exit_hook", queue_set_exit_hook},
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
  mp_add_tests(L, tests);
}
