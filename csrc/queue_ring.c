/*
 * queue_ring.c: a queue's shared segment (queue.h): its lock, the journal
 * through which the ring's state changes, and the records in the ring.
 *
 * The ring holds whole records (a length, then a codec message, 8-aligned).
 * A record never wraps: when it does not fit at the end of the ring it
 * goes to the start and the state remembers where the first run of records
 * ends (wrap). When no room is left the ring grows: the memfd is made
 * larger (ftruncate), the wrapped run is copied behind the first one, and
 * every process remaps (mremap) when it next takes the lock and sees a new
 * capacity. So an item of any size goes through in one copy in and one copy
 * out, memory grows only with what is queued, and a ring that grew large
 * goes back to its base size once drained (its pages are given back with a
 * hole punched in the memfd, which is sealed against shrinking: see shm.c).
 *
 * The lock is the robust lock of lock.h (docs/design.md, decision 2): a
 * waiter whose holder died takes it over. Each change of the ring's state
 * is committed through a journal (copy the new state, mark it valid, apply
 * it, clear the mark) and every locker replays a valid journal first, so a
 * process killed at any point leaves either the old state or the new one:
 * a half-written item is never visible and its room is reused, a consumer
 * killed in get loses no item (one that took a marked record and died
 * before receiving its datagram leaves an orphan datagram, which the next
 * such get drops: queue_chan.c). The lock is not interrupted by signals: it
 * is held for one copy.
 *
 * What the segment holds is untrusted: a state is checked (mpq_sane) and a
 * record's length against its run before any offset is used, and the ring
 * is mapped only as far as the segment reaches; the checks are compares,
 * no system call is added to a put or a get.
 */
#include "queue.h"

#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define SHRINK_CAP  (16u * 1024 * 1024)  /* a drained ring above this shrinks */
#define POPULATE_MIN (4u << 20)          /* prefault copies this large */
#define MAX_CAP     ((uint64_t)1 << 48)  /* beyond what q_reserve makes */

MP_API int mpq_crash_stage;

/* Apply a journal that a holder killed inside mpq_commit left valid. */
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
MP_API void mpq_lock(qshm *s) {
  mp_lock_acquire_brief(&s->lock, mp_lock_self());
  q_replay(s);
}

MP_API void mpq_unlock(qshm *s) {
  mp_lock_release(&s->lock);
}

/* Make ns the state, so that a death at any point leaves old or new. */
MP_API void mpq_commit(qshm *s, const qstate *ns) {
  if (mpq_crash_stage == 1) _exit(9);
  s->jr = *ns;
  mp_atomic_store(&s->jvalid, 1);
  if (mpq_crash_stage == 2) _exit(9);
  s->st = *ns;
  mp_atomic_store(&s->jvalid, 0);
}

MP_API void mpq_unfinished_add(mp_queue *q, int64_t delta) {
  qshm *s = q->shm;
  qstate st;
  int64_t v;
  if (q->kind != K_JOINABLE || delta == 0) return;
  mpq_lock(s);
  st = s->st;
  v = (int64_t)st.unfinished + delta;
  st.unfinished = v > 0 ? (uint32_t)v : 0;
  mpq_commit(s, &st);
  mpq_unlock(s);
  if (st.unfinished == 0) mp_futex_wake(&s->st.unfinished, 0x7fffffff);
}

/* Can st, a copy of the state read from shared memory, be followed without
   leaving a ring of st->cap bytes? (Whether the segment holds that many is
   mpq_remap's business.) */
MP_API int mpq_sane(const qstate *st) {
  uint64_t cap = st->cap;
  if (cap < BASE_CAP || cap > MAX_CAP || (cap & (cap - 1)) != 0) return 0;
  if ((st->head | st->tail | st->wrap) & 7) return 0;   /* records are 8-aligned */
  if (st->wrap == 0) return st->head <= st->tail && st->tail <= cap;
  return st->tail <= st->head && st->head <= st->wrap && st->wrap <= cap;
}

/* Map the ring at capacity cap, from a state that passed mpq_sane (under the
   lock). 0, Q_CORRUPT when the segment does not reach that far (it is
   sealed against shrinking, so once it does it always will), or errno. */
MP_API int mpq_remap(mp_queue *q, uint64_t cap64) {
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

/* Append a record whose payload is h[0, hlen) then p[0, len) to the ring
   and commit it; under the lock, with st a copy of the state (reset when
   empty). Returns 0 or an errno (the ring could not grow); *wake tells
   whether to wake a sleeping consumer. */
MP_API int mpq_write(mp_queue *q, qstate *st, const char *h, size_t hlen,
                     const char *p, uint64_t len, int count_task, int *wake) {
  qshm *s = q->shm;
  uint64_t need = mpq_rec_size(hlen + len), off = 0;
  rec *r;
  int err;
  if (!mpq_sane(st)) return Q_CORRUPT;
  if ((err = mpq_remap(q, st->cap)) != 0 || (err = q_reserve(q, st, need, &off)) != 0)
    return err;
  r = (rec *)(q->ring + off);
  r->len = hlen + len;
  q_populate(q, off, need, 1);
  if (hlen) memcpy(q->ring + off + REC_HDR, h, hlen);
  if (len) memcpy(q->ring + off + REC_HDR + hlen, p, (size_t)len);
  st->nitems++;
  if (count_task) st->unfinished++;
  mpq_commit(s, st);
  if (st->nitems == 1 && mp_atomic_load(&s->watchers) > 0) mpq_efd_set(q->efd);
  *wake = mpq_signal(&s->not_empty, &s->sleeping[W_GET]);
  return 0;
}

MP_API int mpq_head(mp_queue *q, qstate *st, const char **payload,
                    uint64_t *len, const char **what) {
  uint64_t run, n;
  int err;
  if (!mpq_sane(st)) {
    *what = "ring state";
    return Q_CORRUPT;
  }
  if ((err = mpq_remap(q, st->cap)) != 0) {
    *what = "ring beyond the segment";
    return err;
  }
  /* the record must lie in its run: [head, wrap) or [head, tail) */
  run = (st->wrap ? st->wrap : st->tail) - st->head;
  if (run < REC_HDR) {
    *what = "no record where one should be";
    return Q_CORRUPT;
  }
  n = ((rec *)(q->ring + st->head))->len;   /* read once */
  if (n > run - REC_HDR || mpq_rec_size(n) > run) {
    *what = "bad record";
    return Q_CORRUPT;
  }
  *payload = q->ring + st->head + REC_HDR;
  *len = n;
  q_populate(q, st->head, mpq_rec_size(n), 0);
  return 0;
}

MP_API void mpq_pop(mp_queue *q, qstate *st, uint64_t len, mpq_take *ft) {
  qshm *s = q->shm;
  uint64_t oldcap;
  int wake_put, wake_get, shrink = 0;
  st->head += mpq_rec_size(len);
  st->nitems--;
  s->ngets++;
  if (st->wrap != 0 && st->head == st->wrap) st->head = st->wrap = 0;
  oldcap = st->cap;
  if (st->nitems == 0) {
    st->head = st->tail = st->wrap = 0;
    if (st->cap > SHRINK_CAP) { st->cap = BASE_CAP; shrink = 1; }
  }
  mpq_commit(s, st);
  /* the record is taken: then its datagram (a consumer killed in between
     leaves an orphan, which the next get of a marked record drops) */
  if (ft != NULL) {
    if (mpq_crash_stage == 4) _exit(9);
    if (ft->ok) ft->ok = mpq_chan_take(q, ft);
  }
  if (shrink) {
    /* the segment cannot shrink (sealed): give back the pages of the
       ring beyond its base size instead; the size stays for a regrowth */
    fallocate(q->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
              (off_t)(HDR_BYTES + BASE_CAP), (off_t)(oldcap - BASE_CAP));
    mpq_remap(q, BASE_CAP);
  }
  if (st->nitems == 0 && mp_atomic_load(&s->watchers) > 0) mpq_efd_clear(q->efd);
  wake_put = mpq_signal(&s->not_full, &s->sleeping[W_PUT]);
  /* feeders wait for room; wake them when half of it is free, so that
     they write in batches rather than one item per get */
  if (mpq_used(st) <= SOFT_BYTES / 2 &&
      mpq_signal(&s->not_full, &s->sleeping[W_FEED]))
    wake_put = 2;
  /* pass the word on if more items wait and more consumers sleep */
  wake_get = st->nitems > 0 && mpq_signal(&s->not_empty, &s->sleeping[W_GET]);
  mpq_unlock(s);
  if (wake_put) mpq_wake(s, &s->not_full, wake_put == 2 ? 0x7fffffff : 1);
  if (wake_get) mpq_wake(s, &s->not_empty, 1);
}
