/*
 * queue_wait.c: waiting on a queue for an item (get) or for room (a
 * bounded put, a feeder), and waking the waiters (queue.h).
 *
 * A wait spins briefly on the item count (the other side is usually a few
 * microseconds away), then sleeps on a sequence word (not_empty, not_full)
 * that the other side bumps and wakes only when someone announced a wait:
 * a sleeper announces itself in one of NSLEEPERS slots of the header that
 * names its pid, so that a waiter killed in its sleep can be found and its
 * announcement cleared. Once a spin has failed, the waits of that queue
 * object sleep at once and only every 32nd wait probes with a short spin
 * (a busy machine: as on a pipe).
 *
 * Signals: a wait lets a signal's Lua hook run before each sleep
 * (mp_interrupted: lua5.4's Ctrl-C raises "interrupted!"), with nothing
 * held and no sleeper announced.
 *
 * Waitable: the queue's eventfd is readable while the queue is not empty,
 * maintained only while some process watches (q:fileno()).
 */
#include "queue.h"

#include <unistd.h>

#define SPIN_PROBE  10e-6             /* spin of a probe after a failure */

MP_API int mpq_can_go(qshm *s, int for_get) {
  uint64_t n = mp_atomic_load(&s->st.nitems);
  return for_get ? n > 0 : (s->maxsize == 0 || n < s->maxsize);
}

/* Announce this process asleep as a waiter of kind k, in a slot that
   names its pid (so that a waiter killed in its sleep can be found).
   Returns the slot, or -1 when all are taken (the caller then sleeps in
   short slices, unannounced). */
MP_API int mpq_sleeper_add(qshm *s, int k) {
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

MP_API void mpq_sleeper_del(qshm *s, int k, int i) {
  if (i < 0) return;
  mp_atomic_fetch_and(&s->sleeping[k], ~((uint64_t)1 << i));
  mp_atomic_store(&s->sleeper[i], 0);
}

/* Wake up to n sleepers on seq. A wake that finds nobody although someone
   was announced may mean a sleeper was killed: every 64th such miss, clear
   the slots of dead processes, so that nobody keeps waking for them. */
MP_API void mpq_wake(qshm *s, uint32_t *seq, int n) {
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
MP_API void mpq_sleep(uint32_t *seq, uint32_t v, int slot, double until) {
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
MP_API int mpq_wait(lua_State *L, mp_queue *q, int for_get, double deadline) {
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
      if ((i & 7) == 0 && mpq_can_go(s, for_get)) {
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
  slot = mpq_sleeper_add(s, kind);
  v = mp_atomic_load(seq);
  if (!mpq_can_go(s, for_get)) mpq_sleep(seq, v, slot, deadline);
  mpq_sleeper_del(s, kind, slot);
  return 0;
}

/* Bump the sequence word if someone sleeps on it; returns whether to wake. */
MP_API int mpq_signal(uint32_t *seq, uint64_t *sleeping) {
  mp_atomic_fence();
  if (mp_atomic_load(sleeping) == 0) return 0;
  mp_atomic_fetch_add(seq, 1);
  return 1;
}

MP_API void mpq_efd_set(int efd) {
  uint64_t one = 1;
  ssize_t r = write(efd, &one, sizeof one);
  (void)r;
}

MP_API void mpq_efd_clear(int efd) {
  uint64_t v;
  ssize_t r = read(efd, &v, sizeof v);
  (void)r;
}
