/*
 * queue.h: what the queue's files share; no other file of the core includes
 * it (the fuzz target does, for the readers of the marker and datagram).
 *
 *   queue.c         the Lua classes Queue, SimpleQueue, JoinableQueue:
 *                   put, get, the other methods, handles
 *   queue_ring.c    the shared segment: its lock, the journal through which
 *                   the ring's state changes, writing and taking records
 *   queue_wait.c    waiting for an item or for room: spins, sleepers
 *                   announced in the header, futex wakes, the eventfd
 *   queue_feeder.c  the feeder: a helper thread that writes a producer's
 *                   waiting items into the ring
 *   queue_chan.c    the descriptor channel beside the ring: the fds of
 *                   items that hold handles, one datagram per item
 *
 * The segment is a memfd: a 4 KiB header (qshm: the lock, the ring's
 * state, futex words) followed by a byte ring of whole records. Everything
 * in it is written by every process that maps it, so what it holds is
 * untrusted: a state is checked (mpq_sane) and a record's length against
 * its run before any offset is used, and the ring is mapped only as far as
 * the segment reaches.
 *
 * An item whose message carries fds (it holds handles) is a marked record:
 * its payload starts with a marker (MARK_LEN bytes: MARK_BYTE, the number
 * of fds, zeros, the item's id), then the codec message; its fds travel as
 * one datagram of the queue's channel (queue_chan.c) that names the same
 * id. Plain records begin with the codec's version byte, never MARK_BYTE.
 */
#ifndef MP_QUEUE_H
#define MP_QUEUE_H

#include "mp.h"
#include "lock.h"

#include <errno.h>

#define HDR_BYTES   4096                /* header page; the ring follows */
#define BASE_CAP    (256u * 1024)       /* ring bytes of a new queue */
#define SOFT_BYTES  (4u * 1024 * 1024)  /* unbounded put: queued bytes above
                                           which items wait in the feeder */
#define MAX_ITEM    ((uint64_t)1 << 40)
#define Q_CORRUPT   EBADMSG             /* a write's "errno" for a corrupt
                                           state (no call it makes sets it) */
#define SPIN_SECS   50e-6               /* longest spin before a futex sleep */
#define NSLEEPERS   64                  /* processes announced asleep at once */
#define REC_HDR     8                   /* a record: u64 length, payload */
#define MARK_BYTE   0xfd                /* a marked record's first byte */
#define MARK_LEN    16                  /* its marker: byte, nfds, zeros, u64 id */

/* the three classes (mp_queue.kind, qshm.kind) */
enum { K_QUEUE, K_SIMPLE, K_JOINABLE };

/* what a sleeper waits for: an item, room (bounded put), room (feeder) */
enum { W_GET, W_PUT, W_FEED };

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
  uint64_t fdseq;       /* last id given to an item with fds (under the lock) */
  char pad1[56];
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

struct feeder;

#define QUEUE_MAGIC 0x4d5051554555u   /* "MPQUEU": never a user address */

/* One process's view of a queue (the userdata of all three classes). */
typedef struct mp_queue {
  uint64_t magic;       /* QUEUE_MAGIC: to_queue's check, as sync.h's */
  qshm *shm;            /* NULL when closed */
  char *ring;           /* ring mapping (mapcap bytes), NULL until first use */
  size_t mapcap;
  int fd, efd;          /* memfd, eventfd */
  int afd, bfd;         /* the descriptor channel: every process sends on
                           afd and receives on bfd (queue_chan.c) */
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

static inline uint64_t mpq_rec_size(uint64_t len) {
  return REC_HDR + ((len + 7) & ~(uint64_t)7);
}

/* Bytes the records of st take. */
static inline uint64_t mpq_used(const qstate *st) {
  return st->wrap ? st->wrap - st->head + st->tail : st->tail - st->head;
}

/* -- queue_ring.c --------------------------------------------------- */
/* Take the queue's lock (then replay the journal), let it go. */
MP_API void mpq_lock(qshm *s);
MP_API void mpq_unlock(qshm *s);
/* Make ns the state through the journal (under the lock). */
MP_API void mpq_commit(qshm *s, const qstate *ns);
/* A JoinableQueue's count of unfinished items moved by delta, under the
   lock (taken here): +1 for an item put, -n for items dropped that no
   consumer will ever get (clamped at 0); join() is woken at 0. Nothing
   for the other kinds. */
MP_API void mpq_unfinished_add(mp_queue *q, int64_t delta);
/* Can the state st (a copy) be followed without leaving a ring of
   st->cap bytes? */
MP_API int mpq_sane(const qstate *st);
/* Map the ring at capacity cap (under the lock): 0, Q_CORRUPT when the
   segment does not reach that far, or an errno. */
MP_API int mpq_remap(mp_queue *q, uint64_t cap);
/* Append a record whose payload is h[0, hlen) then p[0, len) and commit
   it (under the lock; st a copy of the state, reset when empty): 0,
   Q_CORRUPT or an errno (the ring could not grow); *wake: whether to wake
   a sleeping consumer. count_task: a JoinableQueue's put. */
MP_API int mpq_write(mp_queue *q, qstate *st, const char *h, size_t hlen,
                     const char *p, uint64_t len, int count_task, int *wake);
/* Find the head record of st (a copy of the state with items, under the
   lock): its payload and length; 0, Q_CORRUPT with *what saying what is
   wrong, or an errno (the ring could not be mapped). */
MP_API int mpq_head(mp_queue *q, qstate *st, const char **payload,
                    uint64_t *len, const char **what);
/* What a get of a marked record wants from the channel: the fds of item
   id (nfds of them); ok: the marker was well formed, then whether they
   came. */
typedef struct mpq_take {
  uint64_t id;
  int nfds, ok;
  mp_fdlist fds;
} mpq_take;
/* Drop the head record (len bytes of payload) from st and commit, take
   a marked record's fds from the channel (ft, or NULL for a plain one),
   give back the pages of a large drained ring, let the lock go and wake
   whom the room or the items left concern. */
MP_API void mpq_pop(mp_queue *q, qstate *st, uint64_t len, mpq_take *ft);
/* Specs only: the next commit of this process dies (_exit) after the item
   was written (1) or after the journal was (2), holding the lock; a put
   with fds dies after its datagram was sent, before its record is
   written (3); a get of a marked record dies after its record was taken,
   before its datagram was received (4). */
MP_API extern int mpq_crash_stage;

/* -- queue_wait.c --------------------------------------------------- */
/* Could a get (for_get) or a put go ahead now? */
MP_API int mpq_can_go(qshm *s, int for_get);
/* Announce this process asleep as a waiter of kind k: a slot, or -1 when
   all are taken; withdraw the announcement. */
MP_API int mpq_sleeper_add(qshm *s, int k);
MP_API void mpq_sleeper_del(qshm *s, int k, int i);
/* Sleep on seq (whose value was v) until woken or until (-1: forever). */
MP_API void mpq_sleep(uint32_t *seq, uint32_t v, int slot, double until);
/* Wait until a get (for_get) or a put may succeed, or the deadline: 0, or
   -1 when a signal's hook raised (its error is pushed; nothing held). */
MP_API int mpq_wait(lua_State *L, mp_queue *q, int for_get, double deadline);
/* Bump seq if someone sleeps on it (sleeping: the kind's bits); whether
   to wake. */
MP_API int mpq_signal(uint32_t *seq, uint64_t *sleeping);
/* Wake up to n sleepers on seq. */
MP_API void mpq_wake(qshm *s, uint32_t *seq, int n);
/* Make the eventfd readable, or not. */
MP_API void mpq_efd_set(int efd);
MP_API void mpq_efd_clear(int efd);

/* -- queue_chan.c --------------------------------------------------- */
/* Make q's channel (q->afd, q->bfd); raises OSError. */
MP_API void mpq_chan_new(lua_State *L, mp_queue *q);
/* Why afd, bfd (received with a handle) cannot be a channel, or NULL. */
MP_API const char *mpq_chan_check(int afd, int bfd);
/* Under the lock: give the item an id, send its fds (n of them) as one
   datagram and write its marker to mark (MARK_LEN bytes). 0, EAGAIN when
   the channel is full, or an errno (nothing was sent). ring_empty: the
   caller's state of the ring holds no record, so every datagram still in
   a full channel is an orphan or a forgery that no get will take: they
   are dropped and the send tried again. */
MP_API int mpq_chan_send(mp_queue *q, const int *fds, int n, char *mark, int ring_empty);
/* Wait (nothing held) until the channel may take a datagram, or the
   deadline (-1: forever), at most max_wait seconds; EINTR ends it early. */
MP_API void mpq_chan_wait(mp_queue *q, double deadline, double max_wait);
/* Under the lock, the record of item ft->id taken: receive its datagram
   into ft->fds (drop those of older items, orphans, and malformed ones);
   1, or 0 when its fds are lost (nothing then waits for it). */
MP_API int mpq_chan_take(mp_queue *q, mpq_take *ft);
/* Read a marker (a record's first bytes) / a datagram's bytes, both
   untrusted: 1 with the id and the number of fds, or 0 when malformed. */
MP_API int mpq_mark_parse(const char *p, uint64_t len, uint64_t *id, int *nfds);
MP_API int mpq_dgram_parse(const char *p, size_t len, uint64_t *id, int *nfds);
#define DGRAM_LEN 16      /* a datagram's bytes: u32 magic, u32 nfds, u64 id */

/* -- queue_feeder.c ------------------------------------------------- */
/* how a feeder's items get into the ring */
enum {
  FEED_NONE = -1,   /* drop them */
  FEED_GROW,        /* at once, growing the ring (__gc) */
  FEED_WAIT,        /* as room appears (the thread) */
  FEED_DRAIN        /* as room appears while consumers take items; at once
                       after a while without a get (close, exit) */
};
/* For a put on q (the queue at stack index 1): drop what this process's
   feeder has written; whether items still wait in it (a put then goes
   behind them); *err: the errno of a write that failed, minus that of a
   datagram that could not be sent (its item dropped; reported once), or 0. */
MP_API int mpq_feeder_pending(lua_State *L, mp_queue *q, int *err);
/* This process's feeder of q, started now if it has none (raises). */
MP_API struct feeder *mpq_feeder_start(lua_State *L, mp_queue *q);
/* Queue the item h[0, hlen) then p[0, len) in f; p is in the value at
   stack index vi, kept alive until written. fds (NULL or empty: none):
   the item's fds, duplicates that the feeder owns from the call on (it
   closes them once sent or dropped, or when this raises). */
MP_API void mpq_feeder_put(lua_State *L, struct feeder *f, const char *h,
                           size_t hlen, const char *p, uint64_t len, int vi,
                           mp_fdlist *fds);
/* Drop the kept values of written items (any call on the queue). */
MP_API void mpq_feeder_tidy(lua_State *L, mp_queue *q);
/* Items still waiting are dropped when the feeder finishes. */
MP_API void mpq_feeder_cancel(mp_queue *q);
/* Stop the thread, write what waits (mode: FEED_*), free it all. Never
   raises. */
MP_API void mpq_feeder_finish(mp_queue *q, int mode);
/* core.queue_flush_all, core.queue_set_exit_hook */
MP_API extern const luaL_Reg mpq_feeder_funcs[];

#endif
