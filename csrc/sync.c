/*
 * sync.c: Lock, RLock, Semaphore, BoundedSemaphore, Condition, Event and
 * Barrier in shared memory, built on futexes.
 *
 * Each object is one memfd segment (shm.c) holding an mp_syncmem; the
 * userdata (mp_sync) maps it. Under fork the mapping is simply inherited;
 * for the codec an object reduces to (kind, state, fd) and is rebuilt by
 * mapping the fd again.
 *
 * Locks survive the death of their holder. A lock is one 64-bit word:
 * the low 32 bits hold the owner's pid (0 when free), the high 32 bits a
 * tag of the owner (the low bits of its start time, from /proc), so that a
 * recycled pid is not taken for the owner. Acquire is one
 * compare-and-swap. A waiter spins a little, then naps NAPS times for NAP
 * seconds (a nap asks for no wake-up), then sleeps on a futex (wseq) in
 * slices of CHECK_SLICE seconds, and after a slice that ended with the same
 * holder it checks the holder: gone (ESRCH), a zombie, or a different
 * process with that pid means dead, and the waiter takes the lock over with
 * one CAS and returns true, "abandoned". A try (timeout 0) checks at once.
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
 * is one (a Dekker pair of sequentially consistent operations, so no
 * wake-up is lost), and only when no wake is already in flight (woken).
 * As in Python, a Lock may be released by any process; an RLock only by
 * its owner.
 *
 * A Semaphore is one counter changed by compare-and-swap. Condition and
 * Barrier keep their counters in the segment under an internal lock of the
 * same recoverable kind, so a process killed inside one of their short
 * critical sections does not wedge the others.
 *
 * A Value that makes its own lock keeps its element in the lock's segment,
 * beside the lock word (mp_sync_claim_slot), so a locked update moves one
 * cache line between processes, not two.
 *
 * The hot paths (Lock/RLock/Semaphore acquire and release) check their
 * argument inline with lua_touserdata, the block size and a magic number:
 * no registry look-up.
 *
 * Signals: before each sleep (a nap or a futex wait), and so after each
 * sleep a signal cut short, a wait lets the signal's Lua hook run
 * (mp_interrupted: lua5.4's Ctrl-C raises "interrupted!"). The error
 * leaves nothing held and no sleeper counted; a Condition's wait takes its
 * lock back first, a Barrier's wait withdraws its party. The internal lock
 * (ilock) is never interrupted. The uncontended paths never look.
 */
#include "mp.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

/* ---- shared layout -------------------------------------------------- */

#define SYNC_MAGIC  0x4d5053594e43u   /* "MPSYNC": never a user address */
#define SEG_MAGIC   0x6d707331u       /* first word of every segment */
#define PIDMASK     0x3fffffffu
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

enum { K_LOCK, K_RLOCK, K_SEM, K_BSEM, K_COND, K_EVENT, K_BARRIER, K_N };
static const char *const kind_names[K_N] = {
  "Lock", "RLock", "Semaphore", "BoundedSemaphore", "Condition", "Event",
  "Barrier"
};
static const char *const kind_tnames[K_N] = {
  MP_LOCK_T, MP_RLOCK_T, MP_SEMAPHORE_T, MP_BSEMAPHORE_T, MP_CONDITION_T,
  MP_EVENT_T, MP_BARRIER_T
};

enum { B_FILLING, B_ACTING, B_BROKEN };

typedef struct mp_syncmem {
  uint32_t magic, kind;
  uint64_t lock;       /* Lock/RLock word, or the internal lock */
  uint32_t count;      /* RLock recursion level (owner only) */
  uint32_t sleepers;   /* processes asleep on lock */
  uint32_t woken;      /* 1: a release has woken a sleeper that has not
                          yet looked at the lock again */
  uint32_t wseq;       /* futex the sleepers wait on: bumped by a wake */
  uint64_t slot;       /* the element of the Value that made this lock:
                          in the lock word's cache line, so a locked
                          update moves one line between processes */
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

/* ---- atomics -------------------------------------------------------- */

#define LOAD(p)        __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define STORE(p, v)    __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
#define ADD(p, v)      __atomic_add_fetch((p), (v), __ATOMIC_SEQ_CST)
#define SUB(p, v)      __atomic_sub_fetch((p), (v), __ATOMIC_SEQ_CST)
#define CAS(p, e, d)   __atomic_compare_exchange_n((p), (e), (d), 0, \
                         __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)

static void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __asm__ __volatile__("pause");
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

static int ncpus;
static int may_spin(void) {
  if (ncpus == 0) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    ncpus = n > 0 ? (int)n : 1;
  }
  return ncpus > 1;
}

/* ---- process identity ----------------------------------------------- */

static int ident_pid;
static uint64_t ident_word;

/* This process's lock word: pid | start-time tag << 32 (tag 0 when /proc
   cannot be trusted). */
static inline uint64_t my_ident(void) {
  int pid = mp_getpid();
  if (__builtin_expect(pid != ident_pid, 0)) {
    ident_word = (uint64_t)((uint32_t)pid & PIDMASK) |
                 ((uint64_t)mp_start_tag() << 32);
    ident_pid = pid;
  }
  return ident_word;
}

/* Is the process named by lock word w gone? */
static int holder_dead(uint64_t w) {
  int pid = (int)(w & PIDMASK);
  if (w == 0) return 0;
  if (pid == mp_getpid()) return w != my_ident();
  return mp_process_gone(pid, (uint32_t)(w >> 32), 0xffffffffu);
}

/* ---- the lock word -------------------------------------------------- */

enum { L_BUSY = 0, L_OK = 1, L_ABANDONED = 2 };

static int take_over(mp_syncmem *m, uint64_t cur, uint64_t me) {
  return holder_dead(cur) && CAS(&m->lock, &cur, me);
}

/* Acquire the lock word for me within timeout (-1 forever, 0 try).
   Returns L_OK, L_ABANDONED, or L_BUSY (timed out / busy). With L (NULL:
   never interrupted), a signal's hook that raises before a sleep (see
   mp_interrupted) raises from here: nothing is held then, and this waiter
   is no longer counted as a sleeper, so there is nothing to undo. */
static int word_acquire_slow(mp_syncmem *m, uint64_t me, double timeout,
                             lua_State *L) {
  double deadline;
  uint64_t cur = 0;
  uint32_t seq;
  int i, naps = 0;
  if (timeout == 0) {
    for (i = 0; i < 4; i++) {
      cur = LOAD(&m->lock);
      if (cur == 0) {
        if (CAS(&m->lock, &cur, me)) return L_OK;
        continue;
      }
      return take_over(m, cur, me) ? L_ABANDONED : L_BUSY;
    }
    return L_BUSY;
  }
  deadline = timeout > 1e8 ? -1 : mp_deadline(timeout);
  for (;;) {
    double now, until;
    int r = 0;
    for (i = 0; i < (may_spin() ? SPIN : 1); i++) {
      cur = LOAD(&m->lock);
      if (cur == 0 && CAS(&m->lock, &cur, me)) return L_OK;
      cpu_relax();
    }
    if (cur == 0) continue;
    now = mp_now();
    if (deadline >= 0 && now >= deadline)
      return take_over(m, cur, me) ? L_ABANDONED : L_BUSY;
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
    seq = LOAD(&m->wseq);
    ADD(&m->sleepers, 1);
    if (LOAD(&m->lock) == cur)
      r = mp_futex_wait(&m->wseq, seq, until);
    SUB(&m->sleepers, 1);
    /* Awake, so the next release may wake another: cleared before the
       lock is looked at again, so a release that saw the flag set and
       woke no one is seen by the look. */
    if (LOAD(&m->woken)) STORE(&m->woken, 0);
    if (r != ETIMEDOUT) naps = 0;
    else if (LOAD(&m->lock) == cur && take_over(m, cur, me))
      return L_ABANDONED;
  }
}

static inline int word_acquire(mp_syncmem *m, uint64_t me, double timeout,
                               lua_State *L) {
  uint64_t z = 0;
  if (CAS(&m->lock, &z, me)) return L_OK;
  return word_acquire_slow(m, me, timeout, L);
}

/* Wake one futex sleeper, unless a wake is in flight: until the woken
   sleeper has looked at the lock again, further releases make no system
   call. A woken sleeper that dies before it clears the flag only delays
   the others by one CHECK_SLICE. */
static void wake_one(mp_syncmem *m) {
  uint32_t z = 0;
  if (LOAD(&m->woken) == 0 && CAS(&m->woken, &z, 1)) {
    ADD(&m->wseq, 1);
    if (mp_futex_wake(&m->wseq, 1) <= 0) STORE(&m->woken, 0);
  }
}

/* Release; returns the previous word (0: it was not held). */
static inline uint64_t word_release(mp_syncmem *m) {
  uint64_t old = __atomic_exchange_n(&m->lock, 0, __ATOMIC_SEQ_CST);
  if (LOAD(&m->sleepers) > 0) wake_one(m);
  return old;
}

/* Internal lock of Condition/Barrier counters (never times out and is
   never interrupted: its critical sections are a few instructions of C). */
static void ilock(mp_syncmem *m) {
  word_acquire(m, my_ident(), -1, NULL);
}
static void iunlock(mp_syncmem *m) {
  word_release(m);
}

/* value_wait: a signal's hook raised; its error is pushed */
#define W_RAISED (-1)

/* Sleep once while *w == val until deadline: 0 woken, EAGAIN, ETIMEDOUT,
   EINTR (the caller looks again and calls back), or W_RAISED: first, a
   signal's hook ran and raised (mp_interrupted), and nothing slept. */
static int value_wait(lua_State *L, mp_syncmem *m, uint32_t *w, uint32_t val,
                      double deadline) {
  int r;
  if (mp_interrupted(L)) return W_RAISED;
  ADD(&m->vsleepers, 1);
  r = mp_futex_wait(w, val, deadline);
  SUB(&m->vsleepers, 1);
  return r;
}

static void value_wake(mp_syncmem *m, uint32_t *w, int n) {
  if (LOAD(&m->vsleepers) > 0) mp_futex_wake(w, n);
}

/* Deadline of the timeout argument i; a timeout of more than three years
   is forever (so that no time conversion overflows). */
static double opt_deadline(lua_State *L, int i) {
  double t = mp_opttimeout(L, i);
  return t > 1e8 ? -1 : mp_deadline(t);
}

/* ---- userdata ------------------------------------------------------- */


#define LIKELY(x) __builtin_expect(!!(x), 1)

/* The messages of check_sync, out of the hot path. */
static mp_sync *check_sync_fail(lua_State *L, int i, unsigned mask) {
  mp_sync *s = (mp_sync *)lua_touserdata(L, i);
  int k;
  if (s != NULL && lua_rawlen(L, i) == sizeof(mp_sync) &&
      s->magic == SYNC_MAGIC && (mask & (1u << s->kind))) {
    luaL_error(L, "%s is closed", kind_names[s->kind]);
    return NULL;
  }
  for (k = 0; k < K_N; k++)
    if (mask & (1u << k)) break;
  luaL_typeerror(L, i, kind_names[k < K_N ? k : 0]);
  return NULL;
}

/* Cheap check (no registry look-up): a full userdata of our size with our
   magic, of a kind in mask, not closed; else raise. */
static inline mp_sync *check_sync(lua_State *L, int i, unsigned mask) {
  mp_sync *s = (mp_sync *)lua_touserdata(L, i);
  if (LIKELY(s != NULL && lua_rawlen(L, i) == sizeof(mp_sync) &&
             s->magic == SYNC_MAGIC && (mask & (1u << s->kind)) &&
             s->m != NULL))
    return s;
  return check_sync_fail(L, i, mask);
}

#define M_LOCKS ((1u << K_LOCK) | (1u << K_RLOCK))
#define M_SEMS  ((1u << K_SEM) | (1u << K_BSEM))
#define M_ALL   ((1u << K_N) - 1)

static void sync_release(mp_sync *s) {
  if (s->m != NULL) mp_shm_unmap(s->m, s->size);
  s->m = NULL;
  if (s->fd >= 0) close(s->fd);
  s->fd = -1;
}

/* Push a new closed object of kind k with one user value. */
static mp_sync *sync_push(lua_State *L, int k) {
  mp_sync *s = (mp_sync *)lua_newuserdatauv(L, sizeof(mp_sync), 1);
  s->magic = SYNC_MAGIC;
  s->kind = k;
  s->fd = -1;
  s->owner = mp_getpid();
  s->size = 0;
  s->m = NULL;
  luaL_setmetatable(L, kind_tnames[k]);
  return s;
}

static mp_sync *sync_new(lua_State *L, int k) {
  mp_sync *s = sync_push(L, k);
  int fd;
  char name[40];
  snprintf(name, sizeof name, "mp-%s", kind_names[k]);
  s->m = (mp_syncmem *)mp_shm_create(L, name, sizeof(mp_syncmem), 0, &fd);
  s->fd = fd;
  s->size = sizeof(mp_syncmem);
  s->m->magic = SEG_MAGIC;
  s->m->kind = (uint32_t)k;
  return s;
}

/* ---- Lock and RLock ------------------------------------------------- */

/* Push the result of an acquire: true | true, "abandoned" | false */
static int push_acquired(lua_State *L, int r) {
  lua_pushboolean(L, r != L_BUSY);
  if (r == L_ABANDONED) {
    lua_pushliteral(L, "abandoned");
    return 2;
  }
  return 1;
}

/* Acquire s (a Lock or RLock) as the calling process; a signal's hook may
   raise from the wait (nothing held then). */
static inline int lock_acquire_impl(mp_sync *s, double timeout, lua_State *L) {
  mp_syncmem *m = s->m;
  uint64_t me = my_ident();
  int r;
  if (s->kind == K_RLOCK && __atomic_load_n(&m->lock, __ATOMIC_RELAXED) == me) {
    m->count++;
    return L_OK;
  }
  r = word_acquire(m, me, timeout, L);
  if (r != L_BUSY && s->kind == K_RLOCK) m->count = 1;
  return r;
}

/* lock:acquire([timeout]) -> true | true, "abandoned" | false */
static int lock_acquire(lua_State *L) {
  mp_sync *s = check_sync(L, 1, M_LOCKS);
  double timeout = lua_gettop(L) < 2 ? -1 : mp_opttimeout(L, 2);
  return push_acquired(L, lock_acquire_impl(s, timeout, L));
}

/* Release s fully or one level; raises as Python does on misuse. */
static inline void lock_release_impl(lua_State *L, mp_sync *s) {
  mp_syncmem *m = s->m;
  if (s->kind == K_RLOCK) {
    if (__atomic_load_n(&m->lock, __ATOMIC_RELAXED) != my_ident() ||
        m->count == 0) {
      luaL_error(L, "cannot release un-acquired lock (this RLock is not "
                    "held by this process)");
      return;
    }
    if (--m->count > 0) return;
  }
  if (word_release(m) == 0) luaL_error(L, "release unlocked lock");
}

/* lock:release() */
static int lock_release(lua_State *L) {
  lock_release_impl(L, check_sync(L, 1, M_LOCKS));
  return 0;
}

/* lock:locked() -> boolean */
static int lock_locked(lua_State *L) {
  mp_sync *s = check_sync(L, 1, M_LOCKS);
  lua_pushboolean(L, LOAD(&s->m->lock) != 0);
  return 1;
}

/* lock:_is_mine() -> boolean: held by the calling process */
static int lock_is_mine(lua_State *L) {
  mp_sync *s = check_sync(L, 1, M_LOCKS);
  lua_pushboolean(L, LOAD(&s->m->lock) == my_ident());
  return 1;
}

/* lock:_count() -> recursion level (RLock), 1/0 (Lock) */
static int lock_count(lua_State *L) {
  mp_sync *s = check_sync(L, 1, M_LOCKS);
  uint64_t w = LOAD(&s->m->lock);
  lua_pushinteger(L, s->kind == K_RLOCK ? (w ? s->m->count : 0) : (w != 0));
  return 1;
}

/* ---- Semaphore ------------------------------------------------------ */

/* sem:acquire([timeout]) -> true | false */
static int sem_acquire(lua_State *L) {
  mp_sync *s = check_sync(L, 1, M_SEMS);
  double timeout = lua_gettop(L) < 2 ? -1 : mp_opttimeout(L, 2), deadline;
  mp_syncmem *m = s->m;
  uint32_t v;
  int i;
  for (i = 0; i < (timeout != 0 && may_spin() ? SPIN : 1); i++) {
    v = LOAD(&m->value);
    while (v > 0)
      if (CAS(&m->value, &v, v - 1)) goto ok;
    if (timeout != 0) cpu_relax();
  }
  if (timeout == 0) goto busy;
  deadline = timeout > 1e8 ? -1 : mp_deadline(timeout);
  for (;;) {
    int r;
    v = LOAD(&m->value);
    while (v > 0)
      if (CAS(&m->value, &v, v - 1)) goto ok;
    r = value_wait(L, m, &m->value, 0, deadline);
    if (r == W_RAISED) return lua_error(L);   /* nothing taken */
    if (r == ETIMEDOUT) {
      v = LOAD(&m->value);
      while (v > 0)
        if (CAS(&m->value, &v, v - 1)) goto ok;
      goto busy;
    }
  }
ok:
  lua_pushboolean(L, 1);
  return 1;
busy:
  lua_pushboolean(L, 0);
  return 1;
}

/* sem:release(): adds one; a BoundedSemaphore raises past its bound */
static int sem_release(lua_State *L) {
  mp_sync *s = check_sync(L, 1, M_SEMS);
  mp_syncmem *m = s->m;
  uint32_t v = LOAD(&m->value);
  for (;;) {
    if (s->kind == K_BSEM && v >= m->maxvalue)
      return luaL_error(L, "semaphore released too many times");
    if (v == UINT32_MAX) return luaL_error(L, "semaphore value overflow");
    if (CAS(&m->value, &v, v + 1)) break;
  }
  value_wake(m, &m->value, 1);
  return 0;
}

/* sem:get_value() -> integer */
static int sem_get_value(lua_State *L) {
  mp_sync *s = check_sync(L, 1, M_SEMS);
  lua_pushinteger(L, LOAD(&s->m->value));
  return 1;
}

/* ---- Event ---------------------------------------------------------- */

/* ev:is_set() -> boolean */
static int event_is_set(lua_State *L) {
  mp_sync *s = check_sync(L, 1, 1u << K_EVENT);
  lua_pushboolean(L, LOAD(&s->m->value) != 0);
  return 1;
}

/* ev:set() */
static int event_set(lua_State *L) {
  mp_sync *s = check_sync(L, 1, 1u << K_EVENT);
  STORE(&s->m->value, 1);
  value_wake(s->m, &s->m->value, INT32_MAX);
  return 0;
}

/* ev:clear() */
static int event_clear(lua_State *L) {
  mp_sync *s = check_sync(L, 1, 1u << K_EVENT);
  STORE(&s->m->value, 0);
  return 0;
}

/* ev:wait([timeout]) -> boolean: the flag at return */
static int event_wait(lua_State *L) {
  mp_sync *s = check_sync(L, 1, 1u << K_EVENT);
  double deadline = opt_deadline(L, 2);
  mp_syncmem *m = s->m;
  while (LOAD(&m->value) == 0) {
    int r;
    if (deadline >= 0 && mp_now() >= deadline) break;
    r = value_wait(L, m, &m->value, 0, deadline);
    if (r == W_RAISED) return lua_error(L);
    if (r == ETIMEDOUT) break;
  }
  lua_pushboolean(L, LOAD(&m->value) != 0);
  return 1;
}

/* ---- Condition ------------------------------------------------------ */

/* The condition's lock (its user value), checked. */
static mp_sync *cond_lock(lua_State *L, int i) {
  mp_sync *lk;
  lua_getiuservalue(L, i, 1);
  lk = check_sync(L, -1, M_LOCKS);
  lua_pop(L, 1);                         /* kept alive by the condition */
  return lk;
}

/* cond:acquire([timeout]) -> as lock:acquire */
static int cond_acquire(lua_State *L) {
  mp_sync *c = check_sync(L, 1, 1u << K_COND);
  double timeout = mp_opttimeout(L, 2);
  (void)c;
  return push_acquired(L, lock_acquire_impl(cond_lock(L, 1), timeout, L));
}

/* cond:release() */
static int cond_release(lua_State *L) {
  check_sync(L, 1, 1u << K_COND);
  lock_release_impl(L, cond_lock(L, 1));
  return 0;
}

/* Take a notification, if one is there for a waiter that came at
   generation g0 (the value then). Only a notify after g0 gave tokens this
   waiter may take: a process that notifies, releases and waits again
   would otherwise take back its own notification while the waiter it was
   meant for sleeps on. */
static int try_token(mp_syncmem *m, uint32_t g0) {
  uint32_t t;
  if (LOAD(&m->value) == g0) return 0;
  t = LOAD(&m->tokens);
  while (t > 0)
    if (CAS(&m->tokens, &t, t - 1)) return 1;
  return 0;
}

/* cond:wait([timeout]) -> true | false (timeout), plus "abandoned" when
   the lock, taken back, had been abandoned by a dead process. The lock is
   released fully (an RLock at any level) and restored as it was.
   Interrupted by a signal whose hook raises (lua5.4's Ctrl-C), the wait
   ends as Python's does on KeyboardInterrupt: the lock is taken back (an
   RLock at its level; this wait is not interruptible) before the error
   propagates, so the caller's cleanup (a `with`, a release) finds it held;
   a notification that came for this waiter meanwhile goes to another. */
static int cond_wait(lua_State *L) {
  mp_sync *c = check_sync(L, 1, 1u << K_COND);
  double deadline = opt_deadline(L, 2);
  mp_sync *lk = cond_lock(L, 1);
  mp_syncmem *m = c->m, *lm = lk->m;
  uint32_t level, seq, g0;
  int notified = 0, raised = 0, r;
  if (LOAD(&lm->lock) != my_ident())
    return luaL_error(L, "cannot wait on un-acquired lock");
  level = lk->kind == K_RLOCK ? lm->count : 1;
  ilock(m);
  m->waiters++;
  g0 = LOAD(&m->value);
  iunlock(m);
  /* release fully */
  if (lk->kind == K_RLOCK) lm->count = 0;
  word_release(lm);
  for (;;) {
    seq = LOAD(&m->value);
    /* a signal first: an interrupted waiter takes no notification */
    if (mp_interrupted(L)) { raised = 1; break; }
    if (try_token(m, g0)) { notified = 1; break; }
    if (deadline >= 0 && mp_now() >= deadline) break;
    r = value_wait(L, m, &m->value, seq, deadline);
    if (r == W_RAISED) { raised = 1; break; }   /* its error is pushed */
    if (r == ETIMEDOUT) {
      if (try_token(m, g0)) notified = 1;
      break;
    }
  }
  /* take the lock back, then settle the count under the internal lock */
  r = word_acquire(lm, my_ident(), -1, NULL);
  if (lk->kind == K_RLOCK) lm->count = level;
  if (raised) {
    int pass = 0;
    ilock(m);
    if (try_token(m, g0)) {                /* notified meanwhile: pass it on */
      if (m->waiters > 0) {
        m->waiters--;
        m->tokens++;
        ADD(&m->value, 1);
        pass = 1;
      }
    } else if (m->waiters > 0) {
      m->waiters--;
    }
    iunlock(m);
    if (pass) value_wake(m, &m->value, 1);
    return lua_error(L);
  }
  if (!notified) {
    ilock(m);
    if (try_token(m, g0)) notified = 1;
    else if (m->waiters > 0) m->waiters--;
    iunlock(m);
  }
  lua_pushboolean(L, notified);
  if (r == L_ABANDONED) {
    lua_pushliteral(L, "abandoned");
    return 2;
  }
  return 1;
}

static void cond_notify_n(lua_State *L, lua_Integer n) {
  mp_sync *c = check_sync(L, 1, 1u << K_COND);
  mp_sync *lk = cond_lock(L, 1);
  mp_syncmem *m = c->m;
  uint32_t k;
  if (LOAD(&lk->m->lock) != my_ident()) {
    luaL_error(L, "cannot notify on un-acquired lock");
    return;
  }
  ilock(m);
  k = m->waiters;
  if (n >= 0 && (lua_Integer)k > n) k = (uint32_t)n;
  m->waiters -= k;
  m->tokens += k;
  if (k > 0) ADD(&m->value, 1);
  iunlock(m);
  if (k > 0) value_wake(m, &m->value, k >= INT32_MAX ? INT32_MAX : (int)k);
}

/* cond:notify([n=1]) */
static int cond_notify(lua_State *L) {
  lua_Integer n = luaL_optinteger(L, 2, 1);
  luaL_argcheck(L, n >= 0, 2, "must be >= 0");
  cond_notify_n(L, n);
  return 0;
}

/* cond:notify_all() */
static int cond_notify_all(lua_State *L) {
  cond_notify_n(L, -1);
  return 0;
}

/* cond:_lock() -> the lock */
static int cond_getlock(lua_State *L) {
  check_sync(L, 1, 1u << K_COND);
  lua_getiuservalue(L, 1, 1);
  return 1;
}

/* ---- Barrier -------------------------------------------------------- */

/* Wait for generation gen to end; 1 if it passed, 0 broken, -1 timeout,
   -2 a signal's hook raised (its error is pushed). */
static int barrier_await(lua_State *L, mp_syncmem *m, uint32_t gen,
                         double deadline) {
  for (;;) {
    uint32_t g = LOAD(&m->value);
    if (g != gen) return m->outcome[gen % 8] ? 0 : 1;
    if (LOAD(&m->bstate) == B_BROKEN) return 0;
    if (deadline >= 0 && mp_now() >= deadline) return -1;
    if (value_wait(L, m, &m->value, gen, deadline) == W_RAISED) return -2;
  }
}

/* End generation: everyone waiting leaves (broken or not). Under ilock. */
static void barrier_next(mp_syncmem *m, int broken) {
  m->outcome[m->value % 8] = (uint8_t)broken;
  m->bcount = 0;
  m->bstate = B_FILLING;
  ADD(&m->value, 1);
}

/* Break the barrier: this generation ends broken (so its sleepers see
   the futex word change) and later waits say "broken" until reset().
   Under ilock. */
static void barrier_break(mp_syncmem *m) {
  barrier_next(m, 1);
  m->bstate = B_BROKEN;
}

/* b:_wait(timeout_or_nil, has_action) -> index [, true: run the action then
   call _pass or _break] | nil, "broken" | nil, "timeout". Interrupted by
   a signal whose hook raises, a waiting party withdraws (as Python's
   Barrier.wait on KeyboardInterrupt: the count drops, the barrier is not
   broken) and the error propagates. */
static int barrier_wait(lua_State *L) {
  mp_sync *b = check_sync(L, 1, 1u << K_BARRIER);
  double deadline = opt_deadline(L, 2);
  int has_action = lua_toboolean(L, 3);
  mp_syncmem *m = b->m;
  uint32_t gen, index;
  int r;
  for (;;) {
    ilock(m);
    if (m->bstate != B_ACTING) break;
    gen = m->value;
    iunlock(m);                          /* the last party is in its action */
    r = barrier_await(L, m, gen, deadline);
    if (r == -2) return lua_error(L);     /* not counted yet */
    if (r < 0) goto timedout_unlocked;
  }
  if (m->bstate == B_BROKEN) {
    iunlock(m);
    goto broken;
  }
  gen = m->value;
  index = ++m->bcount;
  if (index == m->maxvalue) {
    if (has_action) {
      m->bstate = B_ACTING;
      iunlock(m);
      lua_pushinteger(L, index);
      lua_pushboolean(L, 1);
      return 2;
    }
    barrier_next(m, 0);
    iunlock(m);
    value_wake(m, &m->value, INT32_MAX);
    lua_pushinteger(L, index);
    return 1;
  }
  iunlock(m);
  r = barrier_await(L, m, gen, deadline);
  if (r > 0) {
    lua_pushinteger(L, index);
    return 1;
  }
  ilock(m);
  if (m->value == gen && m->bcount > 0) m->bcount--;
  if (r == -2) {                         /* withdraw, error pushed */
    iunlock(m);
    return lua_error(L);
  }
  if (r < 0 && m->value == gen) {
    barrier_break(m);
    iunlock(m);
    value_wake(m, &m->value, INT32_MAX);
    goto timedout;
  }
  iunlock(m);
broken:
  lua_pushnil(L);
  lua_pushliteral(L, "broken");
  return 2;
timedout_unlocked:
  ilock(m);
  if (m->bstate != B_BROKEN) barrier_break(m);
  iunlock(m);
  value_wake(m, &m->value, INT32_MAX);
timedout:
  lua_pushnil(L);
  lua_pushliteral(L, "timeout");
  return 2;
}

/* b:_pass(): the action succeeded, release this generation */
static int barrier_pass(lua_State *L) {
  mp_sync *b = check_sync(L, 1, 1u << K_BARRIER);
  mp_syncmem *m = b->m;
  ilock(m);
  if (m->bstate == B_ACTING) barrier_next(m, 0);
  iunlock(m);
  value_wake(m, &m->value, INT32_MAX);
  return 0;
}

/* b:abort(): break the barrier; waiting and future waits say "broken" */
static int barrier_abort(lua_State *L) {
  mp_sync *b = check_sync(L, 1, 1u << K_BARRIER);
  mp_syncmem *m = b->m;
  ilock(m);
  barrier_break(m);
  iunlock(m);
  value_wake(m, &m->value, INT32_MAX);
  return 0;
}

/* b:reset(): parties waiting now get "broken"; the barrier is usable again */
static int barrier_reset(lua_State *L) {
  mp_sync *b = check_sync(L, 1, 1u << K_BARRIER);
  mp_syncmem *m = b->m;
  ilock(m);
  barrier_next(m, 1);
  iunlock(m);
  value_wake(m, &m->value, INT32_MAX);
  return 0;
}

/* b:_state() -> {action=, timeout=} */
static int barrier_state(lua_State *L) {
  check_sync(L, 1, 1u << K_BARRIER);
  lua_getiuservalue(L, 1, 1);
  return 1;
}

/* b:_fields() -> parties, n_waiting, broken */
static int barrier_fields(lua_State *L) {
  mp_sync *b = check_sync(L, 1, 1u << K_BARRIER);
  mp_syncmem *m = b->m;
  lua_pushinteger(L, m->maxvalue);
  lua_pushinteger(L, LOAD(&m->bstate) == B_BROKEN ? 0 : LOAD(&m->bcount));
  lua_pushboolean(L, LOAD(&m->bstate) == B_BROKEN);
  return 3;
}

/* ---- common methods ------------------------------------------------- */

/* obj:close(): unmap and close this process's mapping; twice is fine */
static int sync_close(lua_State *L) {
  mp_sync *s = (mp_sync *)lua_touserdata(L, 1);
  if (s == NULL || lua_rawlen(L, 1) != sizeof(mp_sync) ||
      s->magic != SYNC_MAGIC)
    return luaL_typeerror(L, 1, "synchronization object");
  sync_release(s);
  return 0;
}

/* __gc/__close: never raises */
static int sync__gc(lua_State *L) {
  mp_sync *s = (mp_sync *)lua_touserdata(L, 1);
  if (s != NULL && lua_rawlen(L, 1) == sizeof(mp_sync) &&
      s->magic == SYNC_MAGIC)
    sync_release(s);
  return 0;
}

/* obj:fileno() -> the segment's fd */
static int sync_fileno(lua_State *L) {
  mp_sync *s = check_sync(L, 1, M_ALL);
  lua_pushinteger(L, s->fd);
  return 1;
}

static int sync__tostring(lua_State *L) {
  mp_sync *s = (mp_sync *)lua_touserdata(L, 1);
  mp_syncmem *m;
  const char *name;
  if (s == NULL || lua_rawlen(L, 1) != sizeof(mp_sync) ||
      s->magic != SYNC_MAGIC)
    return luaL_typeerror(L, 1, "synchronization object");
  name = kind_names[s->kind];
  m = s->m;
  if (m == NULL) {
    lua_pushfstring(L, "<%s(closed)>", name);
    return 1;
  }
  switch (s->kind) {
    case K_LOCK: case K_RLOCK: {
      uint64_t w = LOAD(&m->lock);
      if (w == 0) lua_pushfstring(L, "<%s(unlocked)>", name);
      else if (s->kind == K_RLOCK)
        lua_pushfstring(L, "<%s(owner=%d, count=%d)>", name,
                        (int)(w & PIDMASK), (int)m->count);
      else lua_pushfstring(L, "<%s(locked by %d)>", name, (int)(w & PIDMASK));
      break;
    }
    case K_SEM:
      lua_pushfstring(L, "<%s(value=%d)>", name, (int)LOAD(&m->value));
      break;
    case K_BSEM:
      lua_pushfstring(L, "<%s(value=%d, maxvalue=%d)>", name,
                      (int)LOAD(&m->value), (int)m->maxvalue);
      break;
    case K_COND: {
      lua_getiuservalue(L, 1, 1);
      lua_pushfstring(L, "<%s(%s, waiters=%d)>", name, luaL_tolstring(L, -1, NULL),
                      (int)LOAD(&m->waiters));
      break;
    }
    case K_EVENT:
      lua_pushfstring(L, "<%s(%s)>", name, LOAD(&m->value) ? "set" : "unset");
      break;
    case K_BARRIER:
      if (LOAD(&m->bstate) == B_BROKEN)
        lua_pushfstring(L, "<%s(parties=%d, broken)>", name, (int)m->maxvalue);
      else
        lua_pushfstring(L, "<%s(parties=%d, waiting=%d)>", name,
                        (int)m->maxvalue, (int)LOAD(&m->bcount));
      break;
  }
  return 1;
}

/* __mp_reduce(obj) -> kind, state, fd. The state is the user value (a
   Condition's lock, a Barrier's {action, timeout}) or false. */
static int sync__reduce(lua_State *L) {
  mp_sync *s = check_sync(L, 1, M_ALL);
  lua_pushstring(L, kind_names[s->kind]);
  if (lua_getiuservalue(L, 1, 1) == LUA_TNIL) {
    lua_pop(L, 1);
    lua_pushboolean(L, 0);
  }
  lua_pushinteger(L, s->fd);
  return 3;
}

/* core.sync_new(kind [, value [, maxvalue]] [, uservalue]) -> object
   (sync.lua validates the arguments) */
static int sync_new_l(lua_State *L) {
  static const char *const opts[] = {
    "Lock", "RLock", "Semaphore", "BoundedSemaphore", "Condition", "Event",
    "Barrier", NULL
  };
  int k = luaL_checkoption(L, 1, NULL, opts);
  lua_Integer v = luaL_optinteger(L, 2, 0);
  mp_sync *s;
  lua_settop(L, 3);
  luaL_argcheck(L, v >= 0 && v <= (lua_Integer)INT32_MAX, 2, "out of range");
  s = sync_new(L, k);
  s->m->value = (uint32_t)(k == K_BARRIER ? 0 : v);
  s->m->maxvalue = (uint32_t)v;
  if (!lua_isnoneornil(L, 3)) {
    lua_pushvalue(L, 3);
    lua_setiuservalue(L, -2, 1);
  }
  return 1;
}

/* core.sync_from_fd(kind, fd [, uservalue]) -> object mapping fd (which
   it owns from now on, closed on failure) */
static int sync_from_fd(lua_State *L) {
  static const char *const opts[] = {
    "Lock", "RLock", "Semaphore", "BoundedSemaphore", "Condition", "Event",
    "Barrier", NULL
  };
  int k = luaL_checkoption(L, 1, NULL, opts);
  int fd = (int)luaL_checkinteger(L, 2);
  size_t size = 0;
  const char *why = NULL;
  mp_sync *s;
  mp_syncmem *m;
  lua_settop(L, 3);
  s = sync_push(L, k);
  m = (mp_syncmem *)mp_shm_map(fd, sizeof(mp_syncmem), &size, &why);
  if (m != NULL && (m->magic != SEG_MAGIC || m->kind != (uint32_t)k)) {
    mp_shm_unmap(m, size);
    m = NULL;
    why = "not such an object";
  }
  if (m == NULL) {
    close(fd);
    return mp_raise(L, "SerializationError", "cannot map %s from fd %d: %s",
                    kind_names[k], fd, why);
  }
  s->m = m;
  s->size = size;
  s->fd = fd;
  if (!lua_isnoneornil(L, 3)) {
    lua_pushvalue(L, 3);
    lua_setiuservalue(L, -2, 1);
  }
  return 1;
}

static const luaL_Reg lock_methods[] = {
  {"acquire", lock_acquire}, {"release", lock_release},
  {"locked", lock_locked}, {"_is_mine", lock_is_mine}, {"_count", lock_count},
  {NULL, NULL}
};
static const luaL_Reg sem_methods[] = {
  {"acquire", sem_acquire}, {"release", sem_release},
  {"get_value", sem_get_value}, {NULL, NULL}
};
static const luaL_Reg cond_methods[] = {
  {"acquire", cond_acquire}, {"release", cond_release}, {"wait", cond_wait},
  {"notify", cond_notify}, {"notify_all", cond_notify_all},
  {"_lock", cond_getlock}, {NULL, NULL}
};
static const luaL_Reg event_methods[] = {
  {"is_set", event_is_set}, {"set", event_set}, {"clear", event_clear},
  {"wait", event_wait}, {NULL, NULL}
};
static const luaL_Reg barrier_methods[] = {
  {"_wait", barrier_wait}, {"_pass", barrier_pass}, {"abort", barrier_abort},
  {"reset", barrier_reset}, {"_fields", barrier_fields}, {"_state", barrier_state}, {NULL, NULL}
};
static const luaL_Reg common_methods[] = {
  {"close", sync_close}, {"fileno", sync_fileno}, {NULL, NULL}
};

/* Register class k with methods; module table at -1. core.<Kind>_methods
   is the methods table (synchronize.lua adds Lua methods to it). */
static void open_class(lua_State *L, int k, const luaL_Reg *methods) {
  static const luaL_Reg sync_meta[] = {
    {"__gc", sync__gc}, {"__close", sync__gc}, {"__tostring", sync__tostring},
    {"__mp_reduce", sync__reduce}, {NULL, NULL}
  };
  char name[64], mtname[64];
  snprintf(name, sizeof name, "%s_methods", kind_names[k]);
  snprintf(mtname, sizeof mtname, "%s_mt", kind_names[k]);
  mp_newclass(L, kind_tnames[k], (const luaL_Reg *const[]){ methods, common_methods, NULL },
              sync_meta, NULL, name);
  lua_setfield(L, -2, mtname);              /* mod */
}

/* ---- the Value slot (sharedctypes.c) --------------------------------- */

MP_API char *mp_sync_slot(void *seg, size_t size, int *code) {
  mp_syncmem *m = (mp_syncmem *)seg;
  if (size < sizeof(mp_syncmem) || m->magic != SEG_MAGIC ||
      (m->kind != K_LOCK && m->kind != K_RLOCK) || m->slotcode == 0)
    return NULL;
  *code = (int)m->slotcode;
  return (char *)&m->slot;
}

MP_API int mp_sync_claim_slot(lua_State *L, int idx, int code) {
  mp_sync *s = check_sync(L, idx, M_LOCKS);
  int fd;
  if (s->m->slotcode != 0) return -1;
  fd = fcntl(s->fd, F_DUPFD_CLOEXEC, 0);
  if (fd < 0) return -1;
  s->m->slotcode = (uint32_t)code;
  return fd;
}

/* core._test.sync_reused(lock): make the lock held by this process's pid
   with another start time: an owner that died and whose pid this live
   process got (specs only). */
static int sync_test_reused(lua_State *L) {
  mp_sync *s = check_sync(L, 1, M_LOCKS);
  uint64_t me = my_ident();
  STORE(&s->m->lock, (me & PIDMASK) |
                     ((uint64_t)mp_other_tag((uint32_t)(me >> 32), 0xffffffffu) << 32));
  return 0;
}

MP_API void mp_sync_open(lua_State *L) {
  static const luaL_Reg tests[] = {
    {"sync_reused", sync_test_reused},
    {NULL, NULL}
  };
  static const luaL_Reg funcs[] = {
    {"sync_new", sync_new_l},
    {"sync_from_fd", sync_from_fd},
    {NULL, NULL}
  };
  open_class(L, K_LOCK, lock_methods);
  open_class(L, K_RLOCK, lock_methods);
  open_class(L, K_SEM, sem_methods);
  open_class(L, K_BSEM, sem_methods);
  open_class(L, K_COND, cond_methods);
  open_class(L, K_EVENT, event_methods);
  open_class(L, K_BARRIER, barrier_methods);
  luaL_setfuncs(L, funcs, 0);
  mp_add_tests(L, tests);
}
