/*
 * process.c: the Process class: start (fork, posix_spawn, or a forkserver
 * child attached), exit status, sentinels, signals, and the C side of the
 * one exit path of a forked child.
 *
 * A Process is a userdata (mp_process) whose user value is a Lua table of
 * its Lua-side fields (name, target, args, daemon, an overriding run, and
 * anything the user stores); process.lua adds start and run to the methods.
 * Exit status is waited for without signal handlers (docs/design.md,
 * decision 5): the sentinel is a pidfd, readable once the child has ended,
 * and waitpid is called on that pid only, so a host's SIGCHLD handling is
 * left alone and a pid is never signalled after it was reaped (it could be
 * reused).
 *
 * A forked child: stdio is flushed before fork so nothing is written
 * twice; the child asks for SIGKILL when its parent dies
 * (PR_SET_PDEATHSIG) and leaves through core._exit, never returning into
 * the parent's code (process.lua's bootstrap).
 *
 * A spawned child (p:_spawn) is a posix_spawn of the executable with one
 * inherited socket, its bootstrap channel (spawn.lua); it sets its own
 * PR_SET_PDEATHSIG first thing (core._child_init). A forkserver child is
 * not ours: the server sends its pid, a pidfd (for signals, race-free) and
 * the read end of a status pipe on which the server writes the exit code
 * (4 bytes) once it reaped the child; that pipe is the sentinel
 * (p:_attach); such fds come in FdBoxes (fdpass.c). The OS helpers the
 * Lua side of starting needs are osutil.c's; hosts' spawned children
 * enter through embed.c.
 */
#include "mp.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

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
  int remote;    /* started by a forkserver: pidfd is its status pipe */
  int sigfd;     /* remote: a pidfd for signals, or -1 */
  mp_child_hook hook;  /* forked child: run before the bootstrap */
  void *hook_arg;
  int hook_i;
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

/* A forkserver child whose status pipe ended without a code: its server
   died before it reaped it. The server's fds close before the kernel sends
   its children their PDEATHSIG, so the child may still run for a moment,
   and a caller that takes it for gone (a Pool handing its tasks to another
   worker) would see work done twice. Make the end certain: SIGKILL it
   through its pidfd (it is about to die anyway) and wait until it has
   exited (bounded: a SIGKILLed process ends at once unless stuck in the
   kernel). Its code: -9, or 255 (unknown) if it had ended already. */
static int orphan_end(mp_process *p) {
#ifdef SYS_pidfd_send_signal
  struct pollfd pfd;
  int r;
  if (p->sigfd < 0) return 255;
  pfd.fd = p->sigfd;
  pfd.events = POLLIN;
  pfd.revents = 0;
  if (poll(&pfd, 1, 0) > 0) return 255;              /* it had ended */
  if (syscall(SYS_pidfd_send_signal, p->sigfd, SIGKILL, NULL, 0) != 0) return 255;
  do r = poll(&pfd, 1, 5000);
  while (r < 0 && errno == EINTR);
  return -SIGKILL;
#else
  (void)p;
  return 255;
#endif
}

/* A forkserver child: its exit code comes on the status pipe (EOF without
   it: the server died; see orphan_end). */
static int reap_remote(mp_process *p, int block) {
  int32_t code;
  ssize_t r;
  if (!block) {
    struct pollfd pfd;
    pfd.fd = p->pidfd;
    pfd.events = POLLIN;
    pfd.revents = 0;
    if (poll(&pfd, 1, 0) <= 0) return 0;
  }
  do r = read(p->pidfd, &code, sizeof code);
  while (r < 0 && errno == EINTR);
  p->exitcode = r == (ssize_t)sizeof code ? (int)code : orphan_end(p);
  p->state = P_DONE;
  return 1;
}

/* Reap without blocking (or blocking when block); 1 if the process ended. */
static int reap(mp_process *p, int block) {
  int st, r;
  if (p->state != P_STARTED || p->self) return p->state == P_DONE;
  if (p->owner != mp_getpid()) return 0;  /* not our child: cannot wait */
  if (p->remote) return reap_remote(p, block);
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

static int no_pidfd;     /* specs: act as a kernel without pidfd_open */

static int pidfd_open_(int pid) {
  if (no_pidfd) {
    errno = ENOSYS;
    return -1;
  }
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
  p->sigfd = -1;
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
    if (p->hook) p->hook(p->hook_arg, p->hook_i);
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

MP_API void mp_process_set_hook(lua_State *L, int idx, mp_child_hook hook,
                                void *arg, int i) {
  mp_process *p = check_process(L, idx);
  if (p->state != P_INITIAL) luaL_error(L, "the process has been started already");
  p->hook = hook;
  p->hook_arg = arg;
  p->hook_i = i;
}

/* p:join([timeout]) -> exitcode | nil, "timeout". Before each wait, and so
   after a wait that a signal interrupted (EINTR), the signal's hook may
   raise (mp_interrupted: lua5.4's Ctrl-C); otherwise the wait resumes with
   the time that is left. */
static int process_join(lua_State *L) {
  mp_process *p = check_process(L, 1);
  double deadline = mp_deadline(mp_opttimeout(L, 2));
  if (p->self) return luaL_error(L, "a process cannot join itself");
  if (p->state == P_INITIAL) return luaL_error(L, "can only join a started process");
  if (p->state == P_STARTED && p->owner != mp_getpid())
    return luaL_error(L, "can only join a child process");
  while (!reap(p, 0)) {
    int ms = mp_remaining_ms(deadline);
    if (ms == 0) return mp_reason(L, "timeout");
    if (mp_interrupted(L)) return lua_error(L);
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

static int send_signal(lua_State *L, int sig, const char *what) {
  mp_process *p = check_process(L, 1);
  if (p->state == P_INITIAL && !p->self)     /* as Python's, which raises */
    return luaL_error(L, "cannot %s a process that was not started", what);
  /* Only a started, not yet reaped child: its pid cannot have been reused. */
  if (p->state == P_STARTED && !p->self && !reap(p, 0)) {
#ifdef SYS_pidfd_send_signal
    if (p->remote && p->sigfd >= 0) {
      if (syscall(SYS_pidfd_send_signal, p->sigfd, sig, NULL, 0) == 0 ||
          errno == ESRCH)
        return 0;
      /* ENOSYS: a pidfd from a process that has the call, used where it
         is missing (valgrind); the pid is still ours to signal */
      if (errno != ENOSYS)
        return mp_raise_errno(L, errno, "pidfd_send_signal");
    }
#endif
    if (kill(p->pid, sig) != 0 && errno != ESRCH)
      return mp_raise_errno(L, errno, "kill");
  }
  return 0;
}

/* p:terminate() / p:kill() / p:interrupt(): SIGTERM / SIGKILL / SIGINT */
static int process_terminate(lua_State *L) { return send_signal(L, SIGTERM, "terminate"); }
static int process_kill(lua_State *L) { return send_signal(L, SIGKILL, "kill"); }
static int process_interrupt(lua_State *L) { return send_signal(L, SIGINT, "interrupt"); }

static void release(mp_process *p) {
  if (p->pidfd >= 0) close(p->pidfd);
  if (p->sigfd >= 0) close(p->sigfd);
  p->pidfd = p->sigfd = -1;
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

/* core._test.no_pidfd(on): processes started from now on get no pidfd, as
   under a kernel older than 5.3 or valgrind (specs only) */
static int core__test_no_pidfd(lua_State *L) {
  no_pidfd = lua_toboolean(L, 1);
  return 0;
}

/* ---- spawn and forkserver ------------------------------------------ */

/* p:_spawn(exe, argv, childbox) -> pid: posix_spawn exe with argv; the
   child inherits childbox's fd (at the same number), nothing else of ours
   (every fd of the library is close-on-exec). */
static int process__spawn(lua_State *L) {
  mp_process *p = check_process(L, 1);
  const char *exe = luaL_checkstring(L, 2);
  int cfd, flags, r, pid, parent = mp_getpid();
  lua_Integer n, i;
  char **argv;
  posix_spawnattr_t attr;
  sigset_t none;
  luaL_checktype(L, 3, LUA_TTABLE);
  cfd = mp_fdbox_fd(L, 4);
  if (p->state != P_INITIAL)
    return mp_raise(L, "ProcessError", "cannot start a process twice");
  n = luaL_len(L, 3);
  luaL_argcheck(L, n >= 1 && n < 4096, 3, "argv must be a non-empty list");
  argv = (char **)lua_newuserdatauv(L, sizeof(char *) * (size_t)(n + 1), 0);
  for (i = 1; i <= n; i++) {
    const char *a;
    lua_rawgeti(L, 3, i);                 /* anchored by the table */
    a = lua_tostring(L, -1);
    luaL_argcheck(L, a != NULL, 3, "argv must hold strings");
    memcpy(&argv[i - 1], &a, sizeof a);   /* exec's argv is not const */
    lua_pop(L, 1);
  }
  argv[n] = NULL;
  posix_spawnattr_init(&attr);
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
  fflush(NULL);
  flags = fcntl(cfd, F_GETFD);
  fcntl(cfd, F_SETFD, flags & ~FD_CLOEXEC);   /* for the child only */
  if (strchr(exe, '/'))
    r = posix_spawn(&pid, exe, NULL, &attr, argv, environ);
  else
    r = posix_spawnp(&pid, exe, NULL, &attr, argv, environ);
  fcntl(cfd, F_SETFD, flags);
  posix_spawnattr_destroy(&attr);
  if (r != 0)
    return mp_raise(L, "ProcessError", "spawn '%s': %s", exe, strerror(r));
  p->pid = pid;
  p->pidfd = pidfd_open_(pid);
  p->owner = parent;
  p->state = P_STARTED;
  lua_pushinteger(L, pid);
  return 1;
}

/* p:_attach(pid, statusbox, pidfdbox|nil): a child a forkserver forked;
   takes over the boxes' fds. */
static int process__attach(lua_State *L) {
  mp_process *p = check_process(L, 1);
  int pid = (int)luaL_checkinteger(L, 2);
  int sig = !lua_isnoneornil(L, 4);
  mp_fdbox_fd(L, 3);                      /* both open, before taking any */
  if (sig) mp_fdbox_fd(L, 4);
  if (p->state != P_INITIAL)
    return mp_raise(L, "ProcessError", "cannot start a process twice");
  luaL_argcheck(L, pid > 0, 2, "pid must be positive");
  p->pid = pid;
  p->remote = 1;
  p->pidfd = mp_fdbox_take(L, 3);
  if (sig) p->sigfd = mp_fdbox_take(L, 4);
  p->owner = mp_getpid();
  p->state = P_STARTED;
  return 0;
}

/* p:_become(ppid): in a spawned child, this object is the current process */
static int process__become(lua_State *L) {
  mp_process *p = check_process(L, 1);
  p->pid = mp_getpid();
  p->owner = (int)luaL_checkinteger(L, 2);
  p->state = P_STARTED;
  p->self = 1;
  return 0;
}

/* p:_fields() -> the table of its Lua-side fields */
static int process__fields(lua_State *L) {
  check_process(L, 1);
  lua_getiuservalue(L, 1, 1);
  return 1;
}

static const luaL_Reg process_methods[] = {
  {"_fork", process__fork},
  {"_spawn", process__spawn},
  {"_attach", process__attach},
  {"_become", process__become},
  {"_fields", process__fields},
  {"join", process_join},
  {"is_alive", process_is_alive},
  {"terminate", process_terminate},
  {"kill", process_kill},
  {"interrupt", process_interrupt},
  {"close", process_close},
  {NULL, NULL}
};

MP_API void mp_process_open(lua_State *L) {
  static const luaL_Reg tests[] = {
    {"no_pidfd", core__test_no_pidfd},
    {NULL, NULL}
  };
  static const luaL_Reg funcs[] = {
    {"process_new", process_new},
    {NULL, NULL}
  };
  static const luaL_Reg process_meta[] = {
    {"__newindex", process__newindex}, {"__gc", process__gc}, {"__close", process__gc},
    {"__tostring", process__tostring}, {NULL, NULL}
  };
  /* process.lua adds start and run to the methods */
  mp_newclass(L, MP_PROCESS_T, (const luaL_Reg *const[]){ process_methods, NULL },
              process_meta, process__index, "Process_methods");
  lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
  mp_add_tests(L, tests);
}

