/*
 * lock.c: the slow paths of the robust lock (lock.h): waiting, taking over
 * a dead holder's lock, waking a sleeper.
 *
 * A waiter spins a little (SPIN tries), then naps NAPS times for NAP
 * seconds (a nap asks for no wake-up), then sleeps on the futex seq in
 * slices of CHECK_SLICE seconds; after a slice that ended with the same
 * holder it asks whether the holder is gone (mp_process_gone: no such
 * process, a zombie, or another start time under that pid) and if so takes
 * the lock over with one compare-and-swap: MP_LOCK_ABANDONED. A try checks
 * the holder at once, and so does a wait whose deadline passed. Without a
 * /proc that shows our pid namespace only kill(pid, 0) is asked.
 *
 * A brief wait (MP_LOCK_BRIEF, for a lock held for one copy: a queue's)
 * spins longer, BRIEF_SPIN tries, and does not nap: it sleeps on the futex
 * until the release wakes it, since a waiter that napped would leave the
 * ring idle for a nap's length after each hand-over, and the other side
 * of a queue is usually waiting for just that.
 *
 * The naps are for throughput. Two processes trading a lock in a tight
 * loop (locked increments of one Value, say) otherwise hand it over on
 * nearly every turn: each hand-over moves the cache line and, once the
 * loser sleeps, costs the winner a wake-up system call per release, and the
 * loser's futex wait mostly fails at once because the lock changed while it
 * entered the kernel (measured: 3 times slower than running the two loops
 * one after the other). A napping loser costs the holder nothing, so the
 * holder runs in stretches of about NAP, as with a pthread mutex. The price
 * is latency: a lock released during a waiter's first millisecond of
 * waiting is taken up to a nap later (about 50 to 100 us, with the
 * kernel's timer slack). Longer waits sleep on the futex and are woken at
 * once.
 *
 * Release wakes one futex sleeper only when the sleeper count says there
 * is one (a Dekker pair of sequentially consistent operations: the sleeper
 * counts itself, then looks at the owner; the releaser clears the owner,
 * then looks at the count; so no wake-up is lost), and only when no wake
 * is already in flight (woken). A sleeper killed in its sleep leaves the
 * count one too high, which costs releases a needless wake call; one
 * killed before it cleared woken delays the others by one CHECK_SLICE.
 */
#include "lock.h"

#include <errno.h>
#include <unistd.h>

#define CHECK_SLICE 0.05              /* seconds between holder checks */
#define NAP         50e-6             /* seconds a waiter naps ... */
#define NAPS        20                /* ... this many times before it
                                         sleeps until woken */
#define SPIN        16                /* tries before a nap or sleep: a
                                         short spin catches a quick release,
                                         a long one only makes two busy
                                         processes interleave finely and
                                         bounce the cache line (measured:
                                         slower) */
#define BRIEF_SPIN  200               /* tries of a brief wait (below) */

MP_API int mp_lock_self_pid;
MP_API uint64_t mp_lock_self_word;

MP_API uint64_t mp_lock_self_slow(void) {
  int pid = mp_getpid();
  mp_lock_self_word = (uint64_t)((uint32_t)pid & 0x3fffffffu) |
                      ((uint64_t)mp_start_tag() << 32);
  mp_lock_self_pid = pid;
  return mp_lock_self_word;
}

static int ncpus;
MP_API int mp_lock_spins(void) {
  if (ncpus == 0) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    ncpus = n > 1 ? (int)n : 1;
  }
  return ncpus > 1 ? SPIN : 1;
}

MP_API int mp_lock_holder_gone(uint64_t w) {
  int pid = MP_LOCK_PID(w);
  if (w == 0) return 0;
  if (pid == mp_getpid()) return w != mp_lock_self();   /* our pid, reused */
  return mp_process_gone(pid, (uint32_t)(w >> 32), 0xffffffffu);
}

/* Take the lock from cur, its dead holder. */
static int take_over(mp_lock *l, uint64_t cur, uint64_t me) {
  return mp_lock_holder_gone(cur) && mp_atomic_cas(&l->owner, &cur, me);
}

MP_API int mp_lock_try_slow(mp_lock *l, uint64_t me) {
  int i;
  for (i = 0; i < 4; i++) {             /* a free word that others race for */
    uint64_t cur = mp_atomic_load(&l->owner);
    if (cur != 0)
      return take_over(l, cur, me) ? MP_LOCK_ABANDONED : MP_LOCK_BUSY;
    if (mp_atomic_cas(&l->owner, &cur, me)) return MP_LOCK_OK;
  }
  return MP_LOCK_BUSY;
}

MP_API int mp_lock_acquire_until(mp_lock *l, uint64_t me, double deadline,
                                 lua_State *L, int how) {
  uint64_t cur = 0;
  uint32_t seq;
  int i, nap0 = how == MP_LOCK_BRIEF ? NAPS : 0, naps = nap0;  /* done */
  int spins = mp_lock_spins();
  if (how == MP_LOCK_BRIEF && spins > 1) spins = BRIEF_SPIN;
  for (;;) {
    double now, until;
    int r = 0;
    for (i = 0; i < spins; i++) {
      cur = mp_atomic_load(&l->owner);
      if (cur == 0 && mp_atomic_cas(&l->owner, &cur, me)) return MP_LOCK_OK;
      mp_cpu_relax();
    }
    if (cur == 0) continue;
    now = mp_now();
    if (deadline >= 0 && now >= deadline)
      return take_over(l, cur, me) ? MP_LOCK_ABANDONED : MP_LOCK_BUSY;
    /* before each sleep, so that a signal that came during the last one
       (EINTR) or while this loop ran is seen */
    if (L != NULL && mp_interrupted(L)) lua_error(L);
    if (naps < NAPS) {
      /* A nap wants no wake (see the head of this file). */
      until = now + NAP;
      if (deadline >= 0 && deadline < until) until = deadline;
      naps++;
      (void)mp_sleep_until(until);        /* EINTR: looked at above */
      continue;
    }
    until = now + CHECK_SLICE;
    if (deadline >= 0 && deadline < until) until = deadline;
    seq = mp_atomic_load(&l->seq);
    mp_atomic_add_fetch(&l->sleepers, 1);
    if (mp_atomic_load(&l->owner) == cur)
      r = mp_futex_wait(&l->seq, seq, until);
    mp_atomic_sub_fetch(&l->sleepers, 1);
    /* Awake, so the next release may wake another: cleared before the
       lock is looked at again, so a release that saw the flag set and
       woke no one is seen by the look. */
    if (mp_atomic_load(&l->woken)) mp_atomic_store(&l->woken, 0);
    if (r != ETIMEDOUT) naps = nap0;
    else if (mp_atomic_load(&l->owner) == cur && take_over(l, cur, me))
      return MP_LOCK_ABANDONED;
  }
}

/* Until the woken sleeper has looked at the lock again, further releases
   make no system call. */
MP_API void mp_lock_wake(mp_lock *l) {
  uint32_t z = 0;
  if (mp_atomic_load(&l->woken) == 0 && mp_atomic_cas(&l->woken, &z, 1)) {
    mp_atomic_add_fetch(&l->seq, 1);
    if (mp_futex_wake(&l->seq, 1) <= 0) mp_atomic_store(&l->woken, 0);
  }
}

MP_API void mp_lock_forge_reused(mp_lock *l) {
  uint64_t me = mp_lock_self();
  mp_atomic_store(&l->owner, (me & 0xffffffffu) |
                  ((uint64_t)mp_other_tag((uint32_t)(me >> 32), 0xffffffffu) << 32));
}
