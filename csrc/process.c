/*
 * process.c: the Process class under fork: start, exit status, sentinels,
 * signals, and the one exit path of a child.
 *
 * A Process is a userdata (mp_process) whose user value is a Lua table of
 * its Lua-side fields (name, target, args, daemon, an overriding run, and
 * anything the user stores); process.lua adds start and run to the methods.
 * Exit status is waited for without signal handlers (DESIGN.md point 5):
 * the sentinel is a pidfd, readable once the child has ended, and waitpid
 * is called on that pid only, so a host's SIGCHLD handling is left alone
 * and a pid is never signalled after it was reaped (it could be reused).
 *
 * A forked child: stdio is flushed before fork so nothing is written
 * twice; the child asks for SIGKILL when its parent dies
 * (PR_SET_PDEATHSIG) and leaves through core._exit, never returning into
 * the parent's code (process.lua's bootstrap).
 */
#include "mp.h"

#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

MP_API void mp_setpid(int pid);

enum { P_INITIAL, P_STARTED, P_DONE, P_CLOSED };
static const char *const state_names[] = {"initial", "started", "stopped",
                                          "closed"};

typedef struct mp_process {
  int pid;       /* 0 before start */
  int pidfd;     /* sentinel; -1 when none */
  int owner;     /* pid of the process that started it (0: not started) */
  int state;
  int exitcode;  /* valid in P_DONE */
  int self;      /* 1 in the child: this object is the current process */
} mp_process;

static mp_process *to_process(lua_State *L, int i) {
  return (mp_process *)luaL_checkudata(L, i, MP_PROCESS_T);
}

static mp_process *check_process(lua_State *L, int i) {
  mp_process *p = to_process(L, i);
  if (p->state == P_CLOSED) luaL_error(L, "process object is closed");
  return p;
}

static int decode_status(int st) {
  if (WIFEXITED(st)) return WEXITSTATUS(st);
  if (WIFSIGNALED(st)) return -WTERMSIG(st);
  return 255;
}

/* Reap without blocking (or blocking when block); 1 if the process ended. */
static int reap(mp_process *p, int block) {
  int st, r;
  if (p->state != P_STARTED || p->self) return p->state == P_DONE;
  if (p->owner != mp_getpid()) return 0;  /* not our child: cannot wait */
  do r = waitpid(p->pid, &st, block ? 0 : WNOHANG);
  while (r < 0 && errno == EINTR);
  if (r == p->pid) {
    p->exitcode = decode_status(st);
    p->state = P_DONE;
    return 1;
  }
  if (r < 0 && errno == ECHILD) {         /* reaped by someone else */
    p->exitcode = 255;
    p->state = P_DONE;
    return 1;
  }
  return 0;
}

static int pidfd_open_(int pid) {
#ifdef SYS_pidfd_open
  return (int)syscall(SYS_pidfd_open, pid, 0);
#else
  (void)pid;
  errno = ENOSYS;
  return -1;
#endif
}

/* core.process_new(fields) -> Process */
static int process_new(lua_State *L) {
  mp_process *p;
  luaL_checktype(L, 1, LUA_TTABLE);
  p = (mp_process *)lua_newuserdatauv(L, sizeof(mp_process), 1);
  memset(p, 0, sizeof *p);
  p->pidfd = -1;
  luaL_setmetatable(L, MP_PROCESS_T);
  lua_pushvalue(L, 1);
  lua_setiuservalue(L, -2, 1);
  return 1;
}

/* p:_fork(bootstrap, ...) -> pid. The child calls bootstrap(...) under
   lua_pcall and leaves with _exit whatever happens: it never returns into
   the caller's code, even if a signal turns into a Lua error (lua5.4's
   SIGINT hook) before the bootstrap's own handler is in place. */
static int process__fork(lua_State *L) {
  mp_process *p = check_process(L, 1);
  int parent = mp_getpid(), pid, fd;
  luaL_checktype(L, 2, LUA_TFUNCTION);
  if (p->state != P_INITIAL)
    return mp_raise(L, "ProcessError", "cannot start a process twice");
  fflush(NULL);                           /* never write a buffer twice */
  pid = fork();
  if (pid < 0) return mp_raise(L, "ProcessError", "fork: %s", strerror(errno));
  if (pid == 0) {
    int status;
    /* no child outlives a killed parent */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(1);    /* parent died before prctl */
    mp_setpid((int)getpid());
    p->pid = mp_getpid();
    p->owner = parent;
    p->state = P_STARTED;
    p->self = 1;
    status = lua_pcall(L, lua_gettop(L) - 2, 1, 0);
    if (status != LUA_OK) {
      const char *msg = lua_tostring(L, -1);
      fprintf(stderr, "multiprocessing: child %d failed outside its target: %s\n",
              (int)getpid(), msg ? msg : "(error object)");
    }
    fflush(NULL);
    _exit(status == LUA_OK && lua_isinteger(L, -1) ? (int)lua_tointeger(L, -1) & 0xff
                                                  : 1);
  }
  fd = pidfd_open_(pid);
  p->pid = pid;
  p->pidfd = fd;   /* -1 without pidfd support: join then polls waitpid */
  p->owner = parent;
  p->state = P_STARTED;
  lua_pushinteger(L, pid);
  return 1;
}

/* p:join([timeout]) -> exitcode | nil, "timeout" */
static int process_join(lua_State *L) {
  mp_process *p = check_process(L, 1);
  double deadline = mp_deadline(mp_opttimeout(L, 2));
  if (p->self) return luaL_error(L, "a process cannot join itself");
  if (p->state == P_INITIAL) return luaL_error(L, "can only join a started process");
  if (p->state == P_STARTED && p->owner != mp_getpid())
    return luaL_error(L, "can only join a child process");
  while (!reap(p, 0)) {
    int ms = mp_remaining_ms(deadline);
    if (ms == 0) {
      lua_pushnil(L);
      lua_pushliteral(L, "timeout");
      return 2;
    }
    if (p->pidfd >= 0) {
      struct pollfd pfd;
      pfd.fd = p->pidfd;
      pfd.events = POLLIN;
      if (poll(&pfd, 1, ms) > 0) reap(p, 1);
    } else {
      usleep(ms < 0 || ms > 10 ? 10000 : (useconds_t)ms * 1000);
    }
  }
  lua_pushinteger(L, p->exitcode);
  return 1;
}

/* p:is_alive() -> boolean */
static int process_is_alive(lua_State *L) {
  mp_process *p = check_process(L, 1);
  if (p->self) lua_pushboolean(L, 1);
  else if (p->state != P_STARTED) lua_pushboolean(L, 0);
  else lua_pushboolean(L, !reap(p, 0));
  return 1;
}

static int send_signal(lua_State *L, int sig) {
  mp_process *p = check_process(L, 1);
  /* Only a started, not yet reaped child: its pid cannot have been reused. */
  if (p->state == P_STARTED && !p->self && !reap(p, 0)) {
    if (kill(p->pid, sig) != 0 && errno != ESRCH)
      return luaL_error(L, "kill: %s", strerror(errno));
  }
  return 0;
}

/* p:terminate() / p:kill() / p:interrupt(): SIGTERM / SIGKILL / SIGINT */
static int process_terminate(lua_State *L) { return send_signal(L, SIGTERM); }
static int process_kill(lua_State *L) { return send_signal(L, SIGKILL); }
static int process_interrupt(lua_State *L) { return send_signal(L, SIGINT); }

static void release(mp_process *p) {
  if (p->pidfd >= 0) close(p->pidfd);
  p->pidfd = -1;
  p->state = P_CLOSED;
}

/* p:close(): release the sentinel; raises while the process runs */
static int process_close(lua_State *L) {
  mp_process *p = to_process(L, 1);
  if (p->state == P_CLOSED) return 0;
  if (p->state == P_STARTED && !reap(p, 0))
    return luaL_error(L, "cannot close a process while it is still running; "
                         "join or terminate it first");
  release(p);
  return 0;
}

/* __gc/__close: never blocks, never kills. A child still running keeps its
   sentinel so that the exit function can still join it. */
static int process__gc(lua_State *L) {
  mp_process *p = to_process(L, 1);
  if (p->state == P_CLOSED || p->self) return 0;
  if (p->state == P_STARTED && p->owner == mp_getpid() && !reap(p, 0)) return 0;
  release(p);   /* inherited by fork: closes our copy of the fd only */
  return 0;
}

static int process__tostring(lua_State *L) {
  mp_process *p = to_process(L, 1);
  const char *name;
  lua_getiuservalue(L, 1, 1);
  lua_getfield(L, -1, "name");
  name = lua_tostring(L, -1);
  if (p->state == P_STARTED && !p->self) reap(p, 0);
  if (p->state == P_DONE)
    lua_pushfstring(L, "<Process(%s, stopped exitcode=%d)>", name ? name : "?",
                    p->exitcode);
  else
    lua_pushfstring(L, "<Process(%s, %s)>", name ? name : "?",
                    state_names[p->state]);
  return 1;
}

/* Fields computed from the C state; everything else is in the user value. */
static int process__index(lua_State *L) {
  mp_process *p = to_process(L, 1);
  const char *k;
  lua_getiuservalue(L, 1, 1);
  lua_pushvalue(L, 2);
  if (lua_rawget(L, -2) != LUA_TNIL) return 1;      /* instance field */
  lua_pushvalue(L, 2);
  if (lua_rawget(L, lua_upvalueindex(1)) != LUA_TNIL) return 1;  /* method */
  k = lua_tostring(L, 2);
  if (k == NULL || lua_type(L, 2) != LUA_TSTRING) return 0;
  if (strcmp(k, "pid") == 0 || strcmp(k, "ident") == 0) {
    if (p->pid) lua_pushinteger(L, p->pid);
    else lua_pushnil(L);
  } else if (strcmp(k, "exitcode") == 0) {
    if (p->state == P_STARTED) reap(p, 0);
    if (p->state == P_DONE) lua_pushinteger(L, p->exitcode);
    else lua_pushnil(L);
  } else if (strcmp(k, "sentinel") == 0) {
    if (p->pidfd >= 0) lua_pushinteger(L, p->pidfd);
    else lua_pushnil(L);
  } else if (strcmp(k, "_state") == 0) {
    lua_pushstring(L, state_names[p->state]);
  } else if (strcmp(k, "_owner") == 0) {
    lua_pushinteger(L, p->owner);
  } else {
    return 0;
  }
  return 1;
}

static int process__newindex(lua_State *L) {
  mp_process *p = to_process(L, 1);
  const char *k = lua_tostring(L, 2);
  if (k && (strcmp(k, "pid") == 0 || strcmp(k, "exitcode") == 0 ||
            strcmp(k, "sentinel") == 0 || strcmp(k, "ident") == 0))
    return luaL_error(L, "process field '%s' is read-only", k);
  if (k && strcmp(k, "daemon") == 0) {
    luaL_checktype(L, 3, LUA_TBOOLEAN);
    if (p->state != P_INITIAL)
      return luaL_error(L, "process has already started");
  }
  if (k && strcmp(k, "name") == 0) luaL_checktype(L, 3, LUA_TSTRING);
  lua_getiuservalue(L, 1, 1);
  lua_insert(L, 2);
  lua_rawset(L, 2);
  return 0;
}

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

static const luaL_Reg process_methods[] = {
  {"_fork", process__fork},
  {"join", process_join},
  {"is_alive", process_is_alive},
  {"terminate", process_terminate},
  {"kill", process_kill},
  {"interrupt", process_interrupt},
  {"close", process_close},
  {NULL, NULL}
};

MP_API void mp_process_open(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"process_new", process_new},
    {"_exit", core__exit},
    {"getpid", core_getpid},
    {"getppid", core_getppid},
    {"cpu_count", core_cpu_count},
    {"kill", core_kill},
    {NULL, NULL}
  };
  luaL_newmetatable(L, MP_PROCESS_T);     /* mod, mt */
  luaL_newlib(L, process_methods);        /* mod, mt, methods */
  lua_pushvalue(L, -1);
  lua_setfield(L, -4, "Process_methods"); /* process.lua adds start, run */
  lua_pushcclosure(L, process__index, 1);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, process__newindex);
  lua_setfield(L, -2, "__newindex");
  lua_pushcfunction(L, process__gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, process__gc);
  lua_setfield(L, -2, "__close");
  lua_pushcfunction(L, process__tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
}
