/*
 * core.c: luaopen_multiprocessing_core and the small services every file
 * uses: error objects, boxed byte buffers, monotonic time and timeouts, fd
 * lists, the cached pid and process identity (pid plus start time). The
 * services call nothing above them; the opener calls every file's
 * *_open (see docs/design.md, "The layers").
 *
 * Error objects are built by the Lua module multiprocessing.errors (pure
 * Lua, no dependency on this module), so C and Lua raise the same objects.
 */
#include "mp.h"

#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "multiprocessing.h"

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

MP_API int mp_raise(lua_State *L, const char *type, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  pusherrorv(L, type, fmt, ap);
  va_end(ap);
  return lua_error(L);
}

/* ---- boxed buffers ------------------------------------------------- */

static int buf__gc(lua_State *L) {
  mp_buf *b = (mp_buf *)luaL_checkudata(L, 1, MP_BUF_T);
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
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
  return timeout < 0 ? -1 : mp_now() + timeout;
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

/* Cached pid; process.c refreshes it in a forked child. */
static int cached_pid;
MP_API int mp_getpid(void) {
  if (cached_pid == 0) cached_pid = (int)getpid();
  return cached_pid;
}
MP_API void mp_setpid(int pid);
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

/* core.monotonic() -> seconds on CLOCK_MONOTONIC */
static int core_monotonic(lua_State *L) {
  lua_pushnumber(L, mp_now());
  return 1;
}

MP_API void mp_core_open(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"monotonic", core_monotonic},
    {NULL, NULL}
  };
  if (luaL_newmetatable(L, MP_BUF_T)) {
    lua_pushcfunction(L, buf__gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, buf__gc);
    lua_setfield(L, -2, "__close");
  }
  lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
}

/* require "multiprocessing.core" */
MP_EXPORT int luaopen_multiprocessing_core(lua_State *L) {
  lua_newtable(L);
  mp_core_open(L);
  mp_codec_open(L);
  mp_process_open(L);
  mp_conn_open(L);
  mp_auth_open(L);
  mp_shm_open(L);
  mp_sync_open(L);
  mp_queue_open(L);
  mp_pool_open(L);
  return 1;
}
