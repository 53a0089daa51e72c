/*
 * sync_cond.c: Condition and Barrier, the synchronization objects whose
 * counters sit in their segment (sync.h) under its lock, used as an
 * internal lock (ilock) that is never interrupted: its critical sections
 * are a few instructions of C, and a process killed inside one does not
 * wedge the others (the lock is robust, lock.h). mp_sync_open (sync.c)
 * registers their classes with these methods.
 *
 * Waits sleep on the segment's value word (the generation). Signals: a
 * Condition's wait takes its lock back before a signal's error leaves it;
 * a Barrier's wait withdraws its party.
 */
#include "sync.h"

#include <errno.h>

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
  if (mp_atomic_load(&m->value) == g0) return 0;
  t = mp_atomic_load(&m->tokens);
  while (t > 0)
    if (mp_atomic_cas(&m->tokens, &t, t - 1)) return 1;
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
  if (!mp_lock_mine(&lm->lock))
    return luaL_error(L, "cannot wait on un-acquired lock");
  level = lk->kind == K_RLOCK ? lm->lock.count : 1;
  ilock(m);
  m->waiters++;
  g0 = mp_atomic_load(&m->value);
  iunlock(m);
  /* release fully */
  if (lk->kind == K_RLOCK) lm->lock.count = 0;
  mp_lock_release(&lm->lock);
  for (;;) {
    seq = mp_atomic_load(&m->value);
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
  r = mp_lock_acquire(&lm->lock, mp_lock_self(), -1, NULL);
  if (lk->kind == K_RLOCK) lm->lock.count = level;
  if (raised) {
    int pass = 0;
    ilock(m);
    if (try_token(m, g0)) {                /* notified meanwhile: pass it on */
      if (m->waiters > 0) {
        m->waiters--;
        m->tokens++;
        mp_atomic_add_fetch(&m->value, 1);
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
  if (r == MP_LOCK_ABANDONED) {
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
  if (!mp_lock_mine(&lk->m->lock)) {
    luaL_error(L, "cannot notify on un-acquired lock");
    return;
  }
  ilock(m);
  k = m->waiters;
  if (n >= 0 && (lua_Integer)k > n) k = (uint32_t)n;
  m->waiters -= k;
  m->tokens += k;
  if (k > 0) mp_atomic_add_fetch(&m->value, 1);
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
    uint32_t g = mp_atomic_load(&m->value);
    if (g != gen) return m->outcome[gen % 8] ? 0 : 1;
    if (mp_atomic_load(&m->bstate) == B_BROKEN) return 0;
    if (deadline >= 0 && mp_now() >= deadline) return -1;
    if (value_wait(L, m, &m->value, gen, deadline) == W_RAISED) return -2;
  }
}

/* End generation: everyone waiting leaves (broken or not). Under ilock. */
static void barrier_next(mp_syncmem *m, int broken) {
  m->outcome[m->value % 8] = (uint8_t)broken;
  m->bcount = 0;
  m->bstate = B_FILLING;
  mp_atomic_add_fetch(&m->value, 1);
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
  return mp_reason(L, "broken");
timedout_unlocked:
  ilock(m);
  if (m->bstate != B_BROKEN) barrier_break(m);
  iunlock(m);
  value_wake(m, &m->value, INT32_MAX);
timedout:
  return mp_reason(L, "timeout");
}

/* Change a barrier's state under its lock, then wake every waiter. */
enum { B_PASS, B_ABORT, B_RESET };
static int barrier_change(lua_State *L, int how) {
  mp_sync *b = check_sync(L, 1, 1u << K_BARRIER);
  mp_syncmem *m = b->m;
  ilock(m);
  if (how == B_ABORT) barrier_break(m);
  else if (how == B_RESET) barrier_next(m, 1);
  else if (m->bstate == B_ACTING) barrier_next(m, 0);
  iunlock(m);
  value_wake(m, &m->value, INT32_MAX);
  return 0;
}

/* b:_pass(): the action succeeded, release this generation */
static int barrier_pass(lua_State *L) { return barrier_change(L, B_PASS); }

/* b:abort(): break the barrier; waiting and future waits say "broken" */
static int barrier_abort(lua_State *L) { return barrier_change(L, B_ABORT); }

/* b:reset(): parties waiting now get "broken"; the barrier is usable again */
static int barrier_reset(lua_State *L) { return barrier_change(L, B_RESET); }

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
  lua_pushinteger(L, mp_atomic_load(&m->bstate) == B_BROKEN ? 0 : mp_atomic_load(&m->bcount));
  lua_pushboolean(L, mp_atomic_load(&m->bstate) == B_BROKEN);
  return 3;
}

const luaL_Reg mp_cond_methods[] = {
  {"acquire", cond_acquire}, {"release", cond_release}, {"wait", cond_wait},
  {"notify", cond_notify}, {"notify_all", cond_notify_all},
  {"_lock", cond_getlock}, {NULL, NULL}
};

const luaL_Reg mp_barrier_methods[] = {
  {"_wait", barrier_wait}, {"_pass", barrier_pass}, {"abort", barrier_abort},
  {"reset", barrier_reset}, {"_fields", barrier_fields}, {"_state", barrier_state},
  {NULL, NULL}
};
