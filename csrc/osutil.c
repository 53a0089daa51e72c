/*
 * osutil.c: the thin wrappers of system calls the Lua modules need and
 * that belong to no class: pids and the child's exit (core._exit, which
 * leaves without running anything of the parent's: docs/design.md,
 * decision 4), CPUs, kill, waiting on raw fds (core.poll, for mp.wait),
 * SIGINT while a fork server runs, a spawned child's first call
 * (core._child_init), the allocator settled before forks (decision 10),
 * and paths and files for spawn.lua (cwd, realpath, the executable, a
 * file's identity).
 *
 * Failures that a caller can handle return nil, "call: strerror", errno
 * (luaL_fileresult); misuse raises.
 */
#include "mp.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

/* core._exit(code): flush C and Lua buffers, then leave without running
   anything of the parent's (no atexit, no __gc). */
static int core__exit(lua_State *L) {
  int code = (int)luaL_optinteger(L, 1, 0);
  fflush(NULL);
  _exit(code & 0xff);
  return 0;
}

static int core_getpid(lua_State *L) {
  lua_pushinteger(L, mp_getpid());
  return 1;
}

static int core_getppid(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)getppid());
  return 1;
}

/* core.cpu_count() -> CPUs this process may run on */
static int core_cpu_count(lua_State *L) {
  long n = 0;
#ifdef CPU_COUNT
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) n = CPU_COUNT(&set);
#endif
  if (n <= 0) n = sysconf(_SC_NPROCESSORS_ONLN);
  lua_pushinteger(L, n > 0 ? n : 1);
  return 1;
}

/* core.kill(pid, sig): for the pool's supervision and specs */
static int core_kill(lua_State *L) {
  int pid = (int)luaL_checkinteger(L, 1);
  int sig = (int)luaL_optinteger(L, 2, SIGTERM);
  luaL_argcheck(L, pid > 0, 1, "pid must be positive");
  if (kill(pid, sig) != 0) return luaL_fileresult(L, 0, "kill");
  lua_pushboolean(L, 1);
  return 1;
}

/* core._malloc_settle(): have the C allocator merge its small free
   chunks now (glibc does so at the first large request). The fork server
   settles before each fork, and process._start_all before forking several
   (a Pool's workers), so that the children do not: merging writes to the
   header of every free chunk, and a forked child copies each page it
   writes. */
static int core__malloc_settle(lua_State *L) {
  void *(*volatile alloc)(size_t) = malloc;   /* a call the compiler keeps */
  (void)L;
  free(alloc(64 * 1024));
  return 0;
}

/* core._child_init(ppid, fd): first thing in a spawned child: die with the
   parent (and leave at once if it is gone already), keep fd from the
   children this one will start. */
static int core__child_init(lua_State *L) {
  int ppid = (int)luaL_checkinteger(L, 1);
  int fd = (int)luaL_checkinteger(L, 2);
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != ppid) _exit(1);
  fcntl(fd, F_SETFD, FD_CLOEXEC);
  return 0;
}

/* core._test.no_pdeathsig(): specs only: this process no longer dies with
   its parent, as a child the kernel has not yet sent its PDEATHSIG */
static int core__test_no_pdeathsig(lua_State *L) {
  (void)L;
  prctl(PR_SET_PDEATHSIG, 0);
  return 0;
}

/* core._sigint(ignore): true: ignore SIGINT, keeping what it was; false:
   put back what was kept (the fork server ignores Ctrl-C, as Python's
   does; the children it forks get the interpreter's handling back). */
static struct sigaction saved_sigint;
static int sigint_saved;
static int core__sigint(lua_State *L) {
  if (lua_toboolean(L, 1)) {
    struct sigaction ign;
    memset(&ign, 0, sizeof ign);
    ign.sa_handler = SIG_IGN;
    sigemptyset(&ign.sa_mask);
    if (sigaction(SIGINT, &ign, &saved_sigint) == 0) sigint_saved = 1;
  } else if (sigint_saved) {
    sigaction(SIGINT, &saved_sigint, NULL);
    sigint_saved = 0;
  }
  return 0;
}

/* core.getcwd() -> path */
static int core_getcwd(lua_State *L) {
  char buf[PATH_MAX];
  if (getcwd(buf, sizeof buf) == NULL) return luaL_fileresult(L, 0, "getcwd");
  lua_pushstring(L, buf);
  return 1;
}

/* core.chdir(path) -> true | nil, msg */
static int core_chdir(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  if (chdir(path) != 0) return luaL_fileresult(L, 0, path);
  lua_pushboolean(L, 1);
  return 1;
}

/* core._file_id(path) -> string | nil: the file's device, inode, size,
   and modification and change times (as bytes, to compare); a file
   written since has another */
static int core__file_id(lua_State *L) {
  struct stat st;
  int64_t id[7];
  if (stat(luaL_checkstring(L, 1), &st) != 0) return 0;
  id[0] = (int64_t)st.st_dev;
  id[1] = (int64_t)st.st_ino;
  id[2] = (int64_t)st.st_size;
  id[3] = (int64_t)st.st_mtim.tv_sec;
  id[4] = (int64_t)st.st_mtim.tv_nsec;
  id[5] = (int64_t)st.st_ctim.tv_sec;
  id[6] = (int64_t)st.st_ctim.tv_nsec;
  lua_pushlstring(L, (const char *)id, sizeof id);
  return 1;
}

/* core.realpath(path) -> absolute path | nil, msg */
static int core_realpath(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  char buf[PATH_MAX];
  if (realpath(path, buf) == NULL) return luaL_fileresult(L, 0, path);
  lua_pushstring(L, buf);
  return 1;
}

/* core.exepath() -> the running executable's path | nil */
static int core_exepath(lua_State *L) {
  char buf[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return 0;
  lua_pushlstring(L, buf, (size_t)n);
  return 1;
}

/* core.poll(fds, [timeout]) -> list of the positions in fds that are
   readable (or hung up); empty on timeout. A signal's hook may raise from
   the wait (mp_interrupted); otherwise it resumes with the time left. */
static int core_poll(lua_State *L) {
  struct pollfd stackfds[64], *pfd = stackfds;
  lua_Integer n, i, k = 0;
  double deadline;
  int r;
  luaL_checktype(L, 1, LUA_TTABLE);
  deadline = mp_deadline(mp_opttimeout(L, 2));
  n = (lua_Integer)lua_rawlen(L, 1);
  if (n > 64) pfd = (struct pollfd *)lua_newuserdatauv(L, sizeof(*pfd) * (size_t)n, 0);
  for (i = 0; i < n; i++) {
    lua_rawgeti(L, 1, i + 1);
    pfd[i].fd = (int)luaL_checkinteger(L, -1);
    pfd[i].events = POLLIN;
    pfd[i].revents = 0;
    lua_pop(L, 1);
  }
  for (;;) {
    r = poll(pfd, (nfds_t)n, mp_remaining_ms(deadline));
    if (r >= 0 || errno != EINTR) break;
    if (mp_interrupted(L)) return lua_error(L);
  }
  if (r < 0) return luaL_fileresult(L, 0, "poll");
  lua_createtable(L, r, 0);
  for (i = 0; i < n; i++)
    if (pfd[i].revents) {
      lua_pushinteger(L, i + 1);
      lua_rawseti(L, -2, ++k);
    }
  return 1;
}

/* core._fd_is_open(n) -> boolean: n is an open file descriptor (poll()
   skips a negative one and reports a closed one as ready) */
static int core_fd_is_open(lua_State *L) {
  lua_Integer fd = luaL_checkinteger(L, 1);
  lua_pushboolean(L, fd >= 0 && fd <= INT_MAX && fcntl((int)fd, F_GETFD) != -1);
  return 1;
}

/* core.isatty(fd) -> boolean */
static int core_isatty(lua_State *L) {
  lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)));
  return 1;
}

MP_API void mp_osutil_open(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"_exit", core__exit},
    {"getpid", core_getpid},
    {"getppid", core_getppid},
    {"cpu_count", core_cpu_count},
    {"kill", core_kill},
    {"poll", core_poll},
    {"_fd_is_open", core_fd_is_open},
    {"isatty", core_isatty},
    {"_malloc_settle", core__malloc_settle},
    {"_child_init", core__child_init},
    {"_sigint", core__sigint},
    {"getcwd", core_getcwd},
    {"chdir", core_chdir},
    {"realpath", core_realpath},
    {"_file_id", core__file_id},
    {"exepath", core_exepath},
    {NULL, NULL}
  };
  static const luaL_Reg tests[] = {
    {"no_pdeathsig", core__test_no_pdeathsig},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
  mp_add_tests(L, tests);
}
