/*
 * lock.h: the one robust lock of the library (docs/design.md, decision 2),
 * a struct in shared memory that every process mapping it may take:
 * sync.c's Lock and RLock and the internal lock of Condition and Barrier,
 * and the lock of each queue's ring (queue_ring.c).
 *
 * The owner word holds the holder's pid (low 32 bits) and a tag of its
 * start time (high 32 bits, from /proc; 0 when /proc cannot be trusted),
 * so that a process that got a dead holder's pid is not taken for it.
 * Ownership is per process: the threads of one process are one owner.
 * Acquire and release are one compare-and-swap and one exchange, inline
 * here; a waiter's slow path, the dead-holder check and the wake-up are in
 * lock.c. A waiter that finds the holder dead (gone, a zombie, or its pid
 * now names another process) takes the lock over with one compare-and-swap
 * and is told MP_LOCK_ABANDONED: what the lock guarded may be half changed.
 * Any process may release (Python's Lock allows it); whether the caller
 * holds the lock is the caller's check (mp_lock_mine).
 */
#ifndef MP_LOCK_H
#define MP_LOCK_H

#include "mp.h"
#include "atomics.h"

typedef struct mp_lock {
  uint64_t owner;      /* 0 when free, else the holder's mp_lock_self() */
  uint32_t sleepers;   /* processes asleep on seq */
  uint32_t woken;      /* 1: a release woke a sleeper that has not yet
                          looked at the lock again */
  uint32_t seq;        /* the futex sleepers wait on: bumped by a wake */
  uint32_t count;      /* not the lock's: its user's (an RLock's level) */
} mp_lock;             /* 24 bytes; a zeroed one is free */

/* What an acquire gives. */
enum { MP_LOCK_BUSY = 0, MP_LOCK_OK = 1, MP_LOCK_ABANDONED = 2 };

/* How a wait waits (lock.c): MP_LOCK_NAP, a lock that a program may hold
   for long and trade in tight loops (Lock, RLock): spin a little, nap, then
   sleep; MP_LOCK_BRIEF, a lock held for one copy (a queue's): spin longer,
   then sleep until woken, never nap. */
enum { MP_LOCK_NAP, MP_LOCK_BRIEF };

/* The pid in an owner word. */
#define MP_LOCK_PID(w) ((int)((w) & 0x3fffffffu))

MP_API extern int mp_lock_self_pid;
MP_API extern uint64_t mp_lock_self_word;
MP_API uint64_t mp_lock_self_slow(void);

/* This process's owner word (cached; recomputed after a fork). */
static inline uint64_t mp_lock_self(void) {
  if (__builtin_expect(mp_getpid() != mp_lock_self_pid, 0))
    return mp_lock_self_slow();
  return mp_lock_self_word;
}

/* The slow paths (lock.c): a few tries for a try; spins, naps (how) and
   futex sleeps until deadline (absolute, mp_deadline; -1 forever) for a
   wait. A wait with L (NULL: never interrupted) lets a signal's hook run
   before each sleep (mp_interrupted), and raises its error from there:
   nothing is held then, and the waiter is no longer counted as a
   sleeper. */
MP_API int mp_lock_try_slow(mp_lock *l, uint64_t me);
MP_API int mp_lock_acquire_until(mp_lock *l, uint64_t me, double deadline,
                                 lua_State *L, int how);
/* How many times a waiter tries before it naps or sleeps: a few, or 1 on
   one CPU, where a spin only keeps the holder off it. */
MP_API int mp_lock_spins(void);
/* Wake one sleeper, unless a wake is already in flight. */
MP_API void mp_lock_wake(mp_lock *l);
/* Is the process that owner word w names gone (0 for a free word)? */
MP_API int mp_lock_holder_gone(uint64_t w);
/* Specs only: make l held by this process's pid with another start time,
   a dead owner whose pid this live process got. */
MP_API void mp_lock_forge_reused(mp_lock *l);

/* Acquire l as me (mp_lock_self()) within timeout seconds (as from
   mp_opttimeout: -1 forever, 0 one try, more than three years forever).
   MP_LOCK_OK, MP_LOCK_ABANDONED (taken over from a dead holder) or
   MP_LOCK_BUSY (timed out). */
static inline int mp_lock_acquire(mp_lock *l, uint64_t me, double timeout,
                                  lua_State *L) {
  uint64_t z = 0;
  if (mp_atomic_cas(&l->owner, &z, me)) return MP_LOCK_OK;
  if (timeout == 0) return mp_lock_try_slow(l, me);
  return mp_lock_acquire_until(l, me, mp_deadline(timeout), L, MP_LOCK_NAP);
}

/* Acquire l as me for one copy (MP_LOCK_BRIEF): waits as long as it
   takes, never interrupted; MP_LOCK_OK or MP_LOCK_ABANDONED. */
static inline int mp_lock_acquire_brief(mp_lock *l, uint64_t me) {
  uint64_t z = 0;
  if (mp_atomic_cas(&l->owner, &z, me)) return MP_LOCK_OK;
  return mp_lock_acquire_until(l, me, -1, NULL, MP_LOCK_BRIEF);
}

/* Release l (whoever holds it); returns the owner word it had, 0 if it
   was not held. */
static inline uint64_t mp_lock_release(mp_lock *l) {
  uint64_t old = mp_atomic_exchange(&l->owner, 0);
  /* Dekker pair with a sleeper's count-then-look (lock.c) */
  if (mp_atomic_load(&l->sleepers) > 0) mp_lock_wake(l);
  return old;
}

/* Is l held by the calling process? */
static inline int mp_lock_mine(mp_lock *l) {
  return mp_atomic_load(&l->owner) == mp_lock_self();
}

#endif
