/*
 * sync.h: what sync.c (the segment, Lock, RLock, Semaphore, Event, the
 * classes) and sync_cond.c (Condition and Barrier) share; no other file
 * includes it.
 *
 * Each object is one memfd segment (shm.c) holding an mp_syncmem; the
 * userdata (mp_sync) maps it. A Lock or RLock is the segment's robust lock
 * (lock.h; an RLock keeps its level in the lock's count); a Condition or a
 * Barrier keeps its counters under that lock, used as an internal lock
 * that is never interrupted (its critical sections are a few instructions
 * of C), so a process killed inside one does not wedge the others. The
 * other futex word, value, is a semaphore's value, an event's flag, a
 * condition's or a barrier's generation; its sleepers are counted in
 * vsleepers, so that a change wakes only when someone sleeps.
 *
 * The hot paths (Lock/RLock/Semaphore acquire and release) check their
 * argument inline with lua_touserdata, the block size and a magic number:
 * no registry look-up.
 */
#ifndef MP_SYNC_H
#define MP_SYNC_H

#include "mp.h"
#include "lock.h"

#define SYNC_MAGIC  0x4d5053594e43u   /* "MPSYNC": never a user address */
#define SEG_MAGIC   0x6d707331u       /* first word of every segment */

enum { K_LOCK, K_RLOCK, K_SEM, K_BSEM, K_COND, K_EVENT, K_BARRIER, K_N };

#define M_LOCKS ((1u << K_LOCK) | (1u << K_RLOCK))
#define M_SEMS  ((1u << K_SEM) | (1u << K_BSEM))
#define M_ALL   ((1u << K_N) - 1)

enum { B_FILLING, B_ACTING, B_BROKEN };

typedef struct mp_syncmem {
  uint32_t magic, kind;
  mp_lock lock;        /* Lock/RLock (count: the RLock's level), or the
                          internal lock of Condition and Barrier */
  uint64_t slot;       /* the element of the Value that made this lock:
                          in the lock's cache line, so a locked update
                          moves one line between processes */
  uint32_t slotcode;   /* its type code; 0: the slot is unused */
  uint32_t value;      /* futex: semaphore value, event flag, condition
                          generation (bumped only by a notify that gives
                          tokens), barrier generation */
  uint32_t vsleepers;  /* processes asleep on value */
  uint32_t maxvalue;   /* BoundedSemaphore bound, Barrier parties */
  uint32_t waiters;    /* Condition: waiters not yet notified */
  uint32_t tokens;     /* Condition: notifications not yet taken */
  uint32_t bstate;     /* Barrier: B_* */
  uint32_t bcount;     /* Barrier: arrived in this generation */
  uint8_t outcome[8];  /* Barrier: 1 if generation g%8 ended broken */
} mp_syncmem;

typedef struct mp_sync {
  uint64_t magic;
  int kind;
  int fd;
  int owner;           /* pid of the process that mapped it */
  size_t size;         /* bytes mapped */
  mp_syncmem *m;       /* NULL once closed */
} mp_sync;

/* The methods of Condition and Barrier (sync_cond.c), registered by
   mp_sync_open with the others. */
MP_API extern const luaL_Reg mp_cond_methods[];
MP_API extern const luaL_Reg mp_barrier_methods[];

/* check_sync's messages, out of the hot path (raises). */
MP_API mp_sync *mp_sync_check_fail(lua_State *L, int i, unsigned mask);

/* Cheap check (no registry look-up): a full userdata of our size with our
   magic, of a kind in mask, not closed; else raise. */
static inline mp_sync *check_sync(lua_State *L, int i, unsigned mask) {
  mp_sync *s = (mp_sync *)lua_touserdata(L, i);
  if (__builtin_expect(s != NULL && lua_rawlen(L, i) == sizeof(mp_sync) &&
                       s->magic == SYNC_MAGIC && (mask & (1u << s->kind)) &&
                       s->m != NULL, 1))
    return s;
  return mp_sync_check_fail(L, i, mask);
}

/* Push the result of an acquire: true | true, "abandoned" | false */
static inline int push_acquired(lua_State *L, int r) {
  lua_pushboolean(L, r != MP_LOCK_BUSY);
  if (r == MP_LOCK_ABANDONED) {
    lua_pushliteral(L, "abandoned");
    return 2;
  }
  return 1;
}

/* Acquire s (a Lock or RLock) as the calling process; a signal's hook may
   raise from the wait (nothing held then). An abandoned RLock is taken at
   level 1. */
static inline int lock_acquire_impl(mp_sync *s, double timeout, lua_State *L) {
  mp_lock *l = &s->m->lock;
  uint64_t me = mp_lock_self();
  int r;
  if (s->kind == K_RLOCK && mp_atomic_load_relaxed(&l->owner) == me) {
    l->count++;
    return MP_LOCK_OK;
  }
  r = mp_lock_acquire(l, me, timeout, L);
  if (r != MP_LOCK_BUSY && s->kind == K_RLOCK) l->count = 1;
  return r;
}

/* Release s fully or one level; raises as Python does on misuse. */
static inline void lock_release_impl(lua_State *L, mp_sync *s) {
  mp_lock *l = &s->m->lock;
  if (s->kind == K_RLOCK) {
    if (mp_atomic_load_relaxed(&l->owner) != mp_lock_self() || l->count == 0) {
      luaL_error(L, "cannot release un-acquired lock (this RLock is not "
                    "held by this process)");
      return;
    }
    if (--l->count > 0) return;
  }
  if (mp_lock_release(l) == 0) luaL_error(L, "release unlocked lock");
}

/* The internal lock of Condition/Barrier counters: never times out, never
   interrupted. */
static inline void ilock(mp_syncmem *m) {
  mp_lock_acquire(&m->lock, mp_lock_self(), -1, NULL);
}
static inline void iunlock(mp_syncmem *m) {
  mp_lock_release(&m->lock);
}

/* value_wait: a signal's hook raised; its error is pushed */
#define W_RAISED (-1)

/* Sleep once while *w == val until deadline: 0 woken, EAGAIN, ETIMEDOUT,
   EINTR (the caller looks again and calls back), or W_RAISED: first, a
   signal's hook ran and raised (mp_interrupted), and nothing slept. */
static inline int value_wait(lua_State *L, mp_syncmem *m, uint32_t *w,
                             uint32_t val, double deadline) {
  int r;
  if (mp_interrupted(L)) return W_RAISED;
  mp_atomic_add_fetch(&m->vsleepers, 1);
  r = mp_futex_wait(w, val, deadline);
  mp_atomic_sub_fetch(&m->vsleepers, 1);
  return r;
}

static inline void value_wake(mp_syncmem *m, uint32_t *w, int n) {
  if (mp_atomic_load(&m->vsleepers) > 0) mp_futex_wake(w, n);
}

/* Deadline of the timeout argument i; a timeout of more than three years
   is forever (so that no time conversion overflows). */
static inline double opt_deadline(lua_State *L, int i) {
  return mp_deadline(mp_opttimeout(L, i));
}

#endif
