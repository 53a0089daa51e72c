/*
 * ground.c: the small services every C file uses, calling nothing above
 * them: error objects, boxed byte buffers, monotonic time and timeouts, fd
 * lists, the cached pid and process identity (pid plus start time), the
 * "nil, reason" return, the interrupt point of waits (mp_interrupted) and the class-registration
 * helper (mp_newclass). See docs/design.md, "The layers".
 *
 * Error objects are built by the Lua module multiprocessing.errors (pure
 * Lua, no dependency on this module), so C and Lua raise the same objects.
 */
#include "mp.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>


/* ---- error objects ------------------------------------------------- */

static void pusherrorv(lua_State *L, const char *type, const char *fmt,
                       va_list ap) {
  lua_getglobal(L, "require");
  lua_pushliteral(L, "multiprocessing.errors");
  lua_call(L, 1, 1);                      /* errors */
  lua_getfield(L, -1, "new");             /* errors, new */
  lua_remove(L, -2);                      /* new */
  lua_pushstring(L, type);
  lua_pushvfstring(L, fmt, ap);
  lua_call(L, 2, 1);                      /* err */
}

MP_API void mp_pusherror(lua_State *L, const char *type, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  pusherrorv(L, type, fmt, ap);
  va_end(ap);
}

MP_API int mp_reason(lua_State *L, const char *why) {
  lua_pushnil(L);
  lua_pushstring(L, why);
  return 2;
}

MP_API int mp_raise(lua_State *L, const char *type, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  pusherrorv(L, type, fmt, ap);
  va_end(ap);
  return lua_error(L);
}

MP_API int mp_raise_errno(lua_State *L, int err, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  lua_pushvfstring(L, fmt, ap);           /* what */
  va_end(ap);
  mp_pusherror(L, "OSError", "%s: %s", lua_tostring(L, -1), strerror(err));
  lua_pushinteger(L, err);
  lua_setfield(L, -2, "errno");
  return lua_error(L);
}

/* ---- boxed buffers ------------------------------------------------- */

MP_API void mp_buf_free(mp_buf *b) {
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}

static int buf__gc(lua_State *L) {
  mp_buf_free((mp_buf *)luaL_checkudata(L, 1, MP_BUF_T));
  return 0;
}

MP_API mp_buf *mp_buf_push(lua_State *L, size_t cap) {
  mp_buf *b = (mp_buf *)lua_newuserdatauv(L, sizeof(mp_buf), 0);
  b->data = NULL;
  b->len = b->cap = 0;
  luaL_setmetatable(L, MP_BUF_T);
  if (cap > 0) mp_buf_reserve(L, b, cap);
  return b;
}

MP_API char *mp_buf_reserve(lua_State *L, mp_buf *b, size_t n) {
  if (b->cap - b->len < n) {
    size_t cap = b->cap ? b->cap : 256;
    char *p;
    if (n > SIZE_MAX / 2 - b->len) luaL_error(L, "buffer too large");
    while (cap - b->len < n) cap *= 2;
    p = (char *)realloc(b->data, cap);
    if (p == NULL) luaL_error(L, "not enough memory");
    b->data = p;
    b->cap = cap;
  }
  return b->data + b->len;
}

MP_API void mp_buf_add(lua_State *L, mp_buf *b, const void *p, size_t n) {
  memcpy(mp_buf_reserve(L, b, n), p, n);
  b->len += n;
}

/* ---- time ---------------------------------------------------------- */

MP_API double mp_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

MP_API double mp_opttimeout(lua_State *L, int i) {
  double t;
  if (lua_isnoneornil(L, i)) return -1;
  t = luaL_checknumber(L, i);
  luaL_argcheck(L, t >= 0 && t == t, i, "timeout must be a number >= 0");
  return t;
}

MP_API double mp_deadline(double timeout) {
  /* a timeout past about three years is forever: its absolute time would
     overflow a timespec (a futex wait then fails at once, and spins) */
  return timeout < 0 || timeout > 1e8 ? -1 : mp_now() + timeout;
}

MP_API int mp_remaining_ms(double deadline) {
  double left;
  if (deadline < 0) return -1;
  left = deadline - mp_now();
  if (left <= 0) return 0;
  if (left > 2e9 / 1000) return 2000000000;
  return (int)(left * 1000 + 0.999);      /* round up: never wake early */
}

MP_API void mp_fdlist_close(mp_fdlist *l) {
  int i;
  for (i = 0; i < l->n; i++)
    if (l->fd[i] >= 0) close(l->fd[i]);
  l->n = 0;
}

MP_API int mp_fdlist_dup(const mp_fdlist *from, mp_fdlist *to) {
  int i;
  to->n = 0;
  for (i = 0; i < from->n; i++) {
    int d = fcntl(from->fd[i], F_DUPFD_CLOEXEC, 0);
    if (d < 0) {
      int e = errno;
      mp_fdlist_close(to);
      return e;
    }
    to->fd[to->n++] = d;
  }
  return 0;
}

/* Cached pid; process.c refreshes it in a forked child. */
static int cached_pid;
MP_API int mp_getpid(void) {
  if (cached_pid == 0) cached_pid = (int)getpid();
  return cached_pid;
}
MP_API void mp_setpid(int pid) { cached_pid = pid; }

/* ---- process identity: pid plus start time -------------------------- */

/* Read state and start time (clock ticks since boot) from a /proc stat
   file. Returns 0 on success, else an errno. */
static int read_stat(const char *path, char *state, uint64_t *start) {
  char buf[1024], *p;
  FILE *f;
  size_t n;
  int field;
  f = fopen(path, "re");
  if (f == NULL) return errno ? errno : ENOENT;
  n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = '\0';
  p = strrchr(buf, ')');                 /* the name may hold spaces */
  if (p == NULL) return EINVAL;
  p++;
  /* field 3 is the state, field 22 the start time */
  for (field = 3; field <= 22; field++) {
    while (*p == ' ') p++;
    if (*p == '\0') return EINVAL;
    if (field == 3) *state = *p;
    if (field == 22) {
      *start = strtoull(p, NULL, 10);
      return 0;
    }
    while (*p && *p != ' ') p++;
  }
  return EINVAL;
}

static int proc_stat(int pid, char *state, uint64_t *start) {
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/stat", pid);
  return read_stat(path, state, start);
}

static int tag_pid;
static uint32_t tag_value;
static int proc_ok;     /* /proc shows our pid namespace: its data is usable */

MP_API uint32_t mp_start_tag(void) {
  int pid = mp_getpid();
  if (pid != tag_pid) {
    char st;
    uint64_t self = 0, mine = 1;
    proc_ok = read_stat("/proc/self/stat", &st, &self) == 0 &&
              proc_stat(pid, &st, &mine) == 0 && self == mine;
    tag_value = proc_ok ? (uint32_t)self : 0;
    tag_pid = pid;
  }
  return tag_value;
}

MP_API uint32_t mp_other_tag(uint32_t tag, uint32_t mask) {
  return (tag & mask) == 5 ? 6 : 5;
}

MP_API int mp_process_gone(int pid, uint32_t tag, uint32_t mask) {
  char st = '?';
  uint64_t start = 0;
  int e;
  if (pid <= 0) return 0;
  if (kill(pid, 0) != 0 && errno == ESRCH) return 1;
  mp_start_tag();                        /* sets proc_ok */
  if (!proc_ok) return 0;                /* trust kill() alone */
  e = proc_stat(pid, &st, &start);
  if (e == ENOENT) return 1;
  if (e != 0) return 0;
  if (st == 'Z' || st == 'X') return 1;
  return (tag & mask) != 0 && (tag & mask) != ((uint32_t)start & mask);
}

/* ---- signals: let a pending hook run --------------------------------

   lua5.4's SIGINT handler (lua.c, LUA_USE_POSIX) is installed with
   sa_flags 0, so a blocking system call returns EINTR; all it does is set
   a hook on the main thread (lua_sethook(globalL, lstop, LUA_MASKCALL |
   LUA_MASKRET | LUA_MASKLINE | LUA_MASKCOUNT, 1)) whose function raises
   "interrupted!" the next time Lua code runs. A wait in C that only
   retried after EINTR never let it run. mp_interrupted lets it run: it
   calls an empty Lua function (under lua_pcall), where the hook fires and
   may raise. Only a hook that asks to run at the next instruction
   (LUA_MASKCOUNT with count 1: the idiom of an asynchronous interrupt, as
   lua.c's) is run so; a debugger's, a profiler's or a scheduler's hook is
   left alone. In a coroutine the hook is on the main thread, not on the
   running one: such a main-thread hook is run on the running thread for
   the call (if it removes itself there, it is removed from the main thread
   too, so that it raises once), then the thread's own hook is put back.
   During a finalizer Lua runs no hook, so nothing is raised there. */

#define NOOP_KEY "multiprocessing.noop"
#define INTERRUPT_KEY "multiprocessing.interrupt"

static int noop_c(lua_State *L) { (void)L; return 0; }

/* Call the empty function on L under lua_pcall: LUA_OK, or an error
   status with the error on the stack. */
static int run_noop(lua_State *L) {
  if (lua_getfield(L, LUA_REGISTRYINDEX, NOOP_KEY) != LUA_TFUNCTION) {
    lua_pop(L, 1);
    lua_pushcfunction(L, noop_c);
  }
  return lua_pcall(L, 0, 0, 0);
}

/* Does T's hook ask to run at the next instruction? */
static int wants_next(lua_State *T) {
  return lua_gethook(T) != NULL && (lua_gethookmask(T) & LUA_MASKCOUNT) &&
         lua_gethookcount(T) == 1;
}

/* The main thread of L's state, if L is another one (a coroutine) whose
   main thread has a hook asking to run at the next instruction. */
static lua_State *pending_main(lua_State *L) {
  lua_State *M;
  if (lua_pushthread(L)) {               /* L is the main thread */
    lua_pop(L, 1);
    return NULL;
  }
  lua_pop(L, 1);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  M = lua_tothread(L, -1);
  lua_pop(L, 1);
  if (M == NULL || M == L || !wants_next(M) || lua_gethook(M) == lua_gethook(L))
    return NULL;
  return M;
}

/* The error a hook raised is on the stack: remember it (core._is_interrupt)
   and say so. */
static int caught(lua_State *L) {
  lua_pushvalue(L, -1);
  lua_setfield(L, LUA_REGISTRYINDEX, INTERRUPT_KEY);
  return 1;
}

MP_API int mp_interrupted(lua_State *L) {
  lua_State *M;
  if (L == NULL || !lua_checkstack(L, 4)) return 0;
  if (wants_next(L) && run_noop(L) != LUA_OK) return caught(L);
  M = pending_main(L);
  if (M != NULL) {
    lua_Hook own = lua_gethook(L), h = lua_gethook(M);
    int mask = lua_gethookmask(L), count = lua_gethookcount(L), st;
    lua_sethook(L, h, lua_gethookmask(M), lua_gethookcount(M));
    st = run_noop(L);
    /* a hook that removed itself when it ran (lua.c's does) has done its
       work: remove it from the main thread too, or it would raise a
       second time there */
    if (lua_gethook(L) != h)
      lua_sethook(M, lua_gethook(L), lua_gethookmask(L), lua_gethookcount(L));
    lua_sethook(L, own, mask, count);    /* this thread's own hook back */
    if (st != LUA_OK) return caught(L);
  }
  return 0;
}

/* core._is_interrupt(err) -> true when err is the error a signal's hook
   raised last in a wait (for the Lua code that must not swallow it under
   a pcall) */
MP_API int mp_is_interrupt(lua_State *L, int idx) {
  int r;
  idx = lua_absindex(L, idx);
  lua_getfield(L, LUA_REGISTRYINDEX, INTERRUPT_KEY);
  r = !lua_isnil(L, -1) && lua_rawequal(L, idx, -1);
  lua_pop(L, 1);
  return r;
}

static int core__is_interrupt(lua_State *L) {
  luaL_checkany(L, 1);
  lua_pushboolean(L, mp_is_interrupt(L, 1));
  return 1;
}

/* Test hook: a SIGUSR1 handler that does nothing but count, installed
   without SA_RESTART as lua.c installs its own, so that it interrupts
   blocking calls (EINTR) and raises nothing. */
static volatile sig_atomic_t nop_signals;
static void nop_handler(int sig) { (void)sig; nop_signals++; }

/* core._test.nop_signal([install]) -> signal number, signals caught so far
   (specs only) */
static int core__test_nop_signal(lua_State *L) {
  if (lua_toboolean(L, 1)) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = nop_handler;
    sa.sa_flags = 0;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
  }
  lua_pushinteger(L, SIGUSR1);
  lua_pushinteger(L, (lua_Integer)nop_signals);
  return 2;
}

MP_API void mp_newclass(lua_State *L, const char *name, const luaL_Reg *const *methods,
                        const luaL_Reg *meta, lua_CFunction index, const char *export) {
  const char *dot = strrchr(name, '.');
  /* core.classes.<Short> = the metatable's name, for the Lua modules */
  luaL_getsubtable(L, -1, "classes");       /* mod, classes */
  lua_pushstring(L, name);
  lua_setfield(L, -2, dot != NULL ? dot + 1 : name);
  lua_pop(L, 1);                            /* mod */
  luaL_newmetatable(L, name);               /* mod, mt */
  if (meta != NULL) luaL_setfuncs(L, meta, 0);
  if (methods == NULL) return;
  lua_newtable(L);                          /* mod, mt, methods */
  for (; *methods != NULL; methods++) luaL_setfuncs(L, *methods, 0);
  if (export != NULL) {
    lua_pushvalue(L, -1);
    lua_setfield(L, -4, export);
  }
  if (index != NULL) lua_pushcclosure(L, index, 1);
  lua_setfield(L, -2, "__index");           /* mod, mt */
}

MP_API void mp_add_tests(lua_State *L, const luaL_Reg *tests) {
  luaL_getsubtable(L, -1, "_test");         /* mod, _test */
  luaL_setfuncs(L, tests, 0);
  lua_pop(L, 1);
}

/* core.monotonic() -> seconds on CLOCK_MONOTONIC */
static int core_monotonic(lua_State *L) {
  lua_pushnumber(L, mp_now());
  return 1;
}

MP_API void mp_ground_open(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"monotonic", core_monotonic},
    {"_is_interrupt", core__is_interrupt},
    {NULL, NULL}
  };
  static const luaL_Reg buf_meta[] = {
    {"__gc", buf__gc}, {"__close", buf__gc}, {NULL, NULL}
  };
  static const luaL_Reg tests[] = {
    {"nop_signal", core__test_nop_signal}, {NULL, NULL}
  };
  mp_newclass(L, MP_BUF_T, NULL, buf_meta, NULL, NULL);
  lua_pop(L, 1);
  /* the empty function mp_interrupted calls (not vararg: hooks fire at
     its first instruction) */
  if (luaL_loadbuffer(L, "return function() end", 21, "=(multiprocessing)") == LUA_OK &&
      lua_pcall(L, 0, 1, 0) == LUA_OK)
    lua_setfield(L, LUA_REGISTRYINDEX, NOOP_KEY);
  else
    lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
  mp_add_tests(L, tests);
}
