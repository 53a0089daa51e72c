/*
 * sync.c: the synchronization objects' segments and classes, and Lock,
 * RLock, Semaphore and Event (Condition and Barrier: sync_cond.c).
 *
 * Each object is one memfd segment (shm.c) holding an mp_syncmem (sync.h);
 * the userdata (mp_sync) maps it. Under fork the mapping is simply
 * inherited; for the codec an object reduces to (kind, state, fd) and is
 * rebuilt by mapping the fd again.
 *
 * Lock and RLock are the segment's robust lock (lock.h, lock.c;
 * docs/design.md, decision 2): held by a process (pid and start-time tag),
 * taken over when its holder died, acquire then returning true,
 * "abandoned". As in Python, a Lock may be released by any process; an
 * RLock only by its owner. A Semaphore is one counter changed by
 * compare-and-swap; it has no owner.
 *
 * A Value that makes its own lock keeps its element in the lock's segment,
 * beside the lock (mp_sync_claim_slot), so a locked update moves one cache
 * line between processes, not two.
 *
 * Signals: before each sleep (a nap or a futex wait), and so after each
 * sleep a signal cut short, a wait lets the signal's Lua hook run
 * (mp_interrupted: lua5.4's Ctrl-C raises "interrupted!"). The error
 * leaves nothing held and no sleeper counted. The uncontended paths never
 * look.
 */
#include "sync.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static const char *const kind_names[K_N] = {
  "Lock", "RLock", "Semaphore", "BoundedSemaphore", "Condition", "Event",
  "Barrier"
};
static const char *const kind_tnames[K_N] = {
  MP_LOCK_T, MP_RLOCK_T, MP_SEMAPHORE_T, MP_BSEMAPHORE_T, MP_CONDITION_T,
  MP_EVENT_T, MP_BARRIER_T
};

/* ---- userdata ------------------------------------------------------- */

MP_API mp_sync *mp_sync_check_fail(lua_State *L, int i, unsigned mask) {
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

/* lock:acquire([timeout]) -> true | true, "abandoned" | false */
static int lock_acquire(lua_State *L) {
  mp_sync *s = check_sync(L, 1, M_LOCKS);
  double timeout = lua_gettop(L) < 2 ? -1 : mp_opttimeout(L, 2);
  return push_acquired(L, lock_acquire_impl(s, timeout, L));
}

/* lock:release() */
static int lock_release(lua_State *L) {
  lock_release_impl(L, check_sync(L, 1, M_LOCKS));
  return 0;
}

/* lock:locked() -> boolean */
static int lock_locked(lua_State *L) {
  mp_sync *s = check_sync(L, 1, M_LOCKS);
  lua_pushboolean(L, mp_atomic_load(&s->m->lock.owner) != 0);
  return 1;
}

/* lock:_is_mine() -> boolean: held by the calling process */
static int lock_is_mine(lua_State *L) {
  mp_sync *s = check_sync(L, 1, M_LOCKS);
  lua_pushboolean(L, mp_lock_mine(&s->m->lock));
  return 1;
}

/* lock:_count() -> recursion level (RLock), 1/0 (Lock) */
static int lock_count(lua_State *L) {
  mp_sync *s = check_sync(L, 1, M_LOCKS);
  uint64_t w = mp_atomic_load(&s->m->lock.owner);
  lua_pushinteger(L, s->kind == K_RLOCK ? (w ? s->m->lock.count : 0) : (w != 0));
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
  for (i = 0; i < (timeout != 0 ? mp_lock_spins() : 1); i++) {
    v = mp_atomic_load(&m->value);
    while (v > 0)
      if (mp_atomic_cas(&m->value, &v, v - 1)) goto ok;
    if (timeout != 0) mp_cpu_relax();
  }
  if (timeout == 0) goto busy;
  deadline = mp_deadline(timeout);
  for (;;) {
    int r;
    v = mp_atomic_load(&m->value);
    while (v > 0)
      if (mp_atomic_cas(&m->value, &v, v - 1)) goto ok;
    r = value_wait(L, m, &m->value, 0, deadline);
    if (r == W_RAISED) return lua_error(L);   /* nothing taken */
    if (r == ETIMEDOUT) {
      v = mp_atomic_load(&m->value);
      while (v > 0)
        if (mp_atomic_cas(&m->value, &v, v - 1)) goto ok;
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
  uint32_t v = mp_atomic_load(&m->value);
  for (;;) {
    if (s->kind == K_BSEM && v >= m->maxvalue)
      return luaL_error(L, "semaphore released too many times");
    if (v == UINT32_MAX) return luaL_error(L, "semaphore value overflow");
    if (mp_atomic_cas(&m->value, &v, v + 1)) break;
  }
  value_wake(m, &m->value, 1);
  return 0;
}

/* sem:get_value() -> integer */
static int sem_get_value(lua_State *L) {
  mp_sync *s = check_sync(L, 1, M_SEMS);
  lua_pushinteger(L, mp_atomic_load(&s->m->value));
  return 1;
}

/* ---- Event ---------------------------------------------------------- */

/* ev:is_set() -> boolean */
static int event_is_set(lua_State *L) {
  mp_sync *s = check_sync(L, 1, 1u << K_EVENT);
  lua_pushboolean(L, mp_atomic_load(&s->m->value) != 0);
  return 1;
}

/* ev:set() */
static int event_set(lua_State *L) {
  mp_sync *s = check_sync(L, 1, 1u << K_EVENT);
  mp_atomic_store(&s->m->value, 1);
  value_wake(s->m, &s->m->value, INT32_MAX);
  return 0;
}

/* ev:clear() */
static int event_clear(lua_State *L) {
  mp_sync *s = check_sync(L, 1, 1u << K_EVENT);
  mp_atomic_store(&s->m->value, 0);
  return 0;
}

/* ev:wait([timeout]) -> boolean: the flag at return */
static int event_wait(lua_State *L) {
  mp_sync *s = check_sync(L, 1, 1u << K_EVENT);
  double deadline = opt_deadline(L, 2);
  mp_syncmem *m = s->m;
  while (mp_atomic_load(&m->value) == 0) {
    int r;
    if (deadline >= 0 && mp_now() >= deadline) break;
    r = value_wait(L, m, &m->value, 0, deadline);
    if (r == W_RAISED) return lua_error(L);
    if (r == ETIMEDOUT) break;
  }
  lua_pushboolean(L, mp_atomic_load(&m->value) != 0);
  return 1;
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
      uint64_t w = mp_atomic_load(&m->lock.owner);
      if (w == 0) lua_pushfstring(L, "<%s(unlocked)>", name);
      else if (s->kind == K_RLOCK)
        lua_pushfstring(L, "<%s(owner=%d, count=%d)>", name,
                        MP_LOCK_PID(w), (int)m->lock.count);
      else lua_pushfstring(L, "<%s(locked by %d)>", name, MP_LOCK_PID(w));
      break;
    }
    case K_SEM:
      lua_pushfstring(L, "<%s(value=%d)>", name, (int)mp_atomic_load(&m->value));
      break;
    case K_BSEM:
      lua_pushfstring(L, "<%s(value=%d, maxvalue=%d)>", name,
                      (int)mp_atomic_load(&m->value), (int)m->maxvalue);
      break;
    case K_COND: {
      lua_getiuservalue(L, 1, 1);
      lua_pushfstring(L, "<%s(%s, waiters=%d)>", name, luaL_tolstring(L, -1, NULL),
                      (int)mp_atomic_load(&m->waiters));
      break;
    }
    case K_EVENT:
      lua_pushfstring(L, "<%s(%s)>", name, mp_atomic_load(&m->value) ? "set" : "unset");
      break;
    case K_BARRIER:
      if (mp_atomic_load(&m->bstate) == B_BROKEN)
        lua_pushfstring(L, "<%s(parties=%d, broken)>", name, (int)m->maxvalue);
      else
        lua_pushfstring(L, "<%s(parties=%d, waiting=%d)>", name,
                        (int)m->maxvalue, (int)mp_atomic_load(&m->bcount));
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
static const luaL_Reg event_methods[] = {
  {"is_set", event_is_set}, {"set", event_set}, {"clear", event_clear},
  {"wait", event_wait}, {NULL, NULL}
};
static const luaL_Reg common_methods[] = {
  {"close", sync_close}, {"fileno", sync_fileno}, {NULL, NULL}
};

/* rebuild(state, fd) of a handle of the kind named by upvalue 1: the
   object mapping fd, with state (a Condition's lock, a Barrier's action)
   as its user value */
static int sync_rebuild(lua_State *L) {
  lua_settop(L, 2);
  if (!lua_toboolean(L, 1)) {            /* no state */
    lua_pushnil(L);
    lua_replace(L, 1);
  }
  lua_pushvalue(L, lua_upvalueindex(1));  /* state, fd, kind */
  lua_rotate(L, 1, 1);                    /* kind, state, fd */
  lua_rotate(L, 2, 1);                    /* kind, fd, state */
  return sync_from_fd(L);
}

/* Register class k with methods, and the rebuild of its handles; module
   table at -1. core.<Kind>_methods is the methods table (synchronize.lua
   adds Lua methods to it). */
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
  lua_pushstring(L, kind_names[k]);
  lua_pushcclosure(L, sync_rebuild, 1);
  mp_register_handle(L, kind_names[k]);
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
  mp_lock_forge_reused(&s->m->lock);
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
  open_class(L, K_COND, mp_cond_methods);
  open_class(L, K_EVENT, event_methods);
  open_class(L, K_BARRIER, mp_barrier_methods);
  luaL_setfuncs(L, funcs, 0);
  mp_add_tests(L, tests);
}
