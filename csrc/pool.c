/*
 * pool.c: the Pool's engine (docs/design.md, decisions 6 and 7): one
 * channel per worker, the parent's event set, and the worker's loop.
 *
 * A PoolCore userdata (MP_POOL_T) owns, for each worker slot, the parent's
 * end of a Unix socketpair (non-blocking, with an output buffer that is
 * flushed whenever the parent waits, and an input buffer read in large
 * pieces), an epoll set holding every channel, every worker's sentinel and
 * a timerfd armed at the nearest task deadline (so pool:fileno() is one fd
 * an event loop can wait on), and a small shared-memory page in which each
 * worker records the chunk it started last and the one it finished last,
 * so that the parent knows, when a worker dies, which chunk it died in,
 * which it never started (they are handed out again) and which it finished
 * without sending the result (they fail: no task runs twice).
 *
 * pool.lua keeps the books (jobs, chunks, which worker holds what); this
 * file moves bytes: it frames many tasks into one write, reads many results
 * per read, and encodes plain values (nil, booleans, numbers, strings)
 * itself, handing anything else to the codec.
 *
 * Frames: u32 length of what follows, u8 kind, then the body.
 *   DEF     u32 fnid, codec bytes of the function
 *   TASK    u32 seq, u32 fnid, u32 n, n items (u32 argc, argc values)
 *   CLEAR   forget the cached functions;  EXIT   leave the loop
 *   RESULT  u32 seq, u32 n, u32 microseconds, n items:
 *           u8 0, u32 count, count values | u8 1, error value
 *   RETIRE  the worker leaves after this (memory limit)
 *   INITFAIL error value (the initializer raised)
 * Values: u8 tag (nil, false, true, int + 8 bytes, float + 8 bytes,
 * string + u32 length + bytes, codec + u32 length + bytes).
 *
 * The worker runs a whole chunk under one lua_pcall (the runner below);
 * when an item raises, the runner is called again from the next item.
 * A chunk's result is written as soon as the chunk is done, except that
 * the results of quick chunks (under QUICK_US each) ride together while
 * more work is already waiting, for at most BATCH_AGE or BATCH_MAX bytes:
 * one write for many, which is what makes chunksize 1 cheap.
 *
 * Workers ignore SIGINT (Ctrl-C is the parent's business; the parent's
 * terminate or __gc stops them).
 *
 * A forked worker serves its slot of the inherited PoolCore (pc:worker);
 * one with no initializer first waits in C for its first frame, before it
 * enters Lua at all, and leaves from there if that frame is EXIT
 * (lazy_wait).
 * A spawned or forkserver worker has no PoolCore: it receives a PoolWorker
 * handle (MP_POOLWORKER_T; its channel end and the shared page's memfd, by
 * SCM_RIGHTS) and serves that (w:serve); both run the same loop (serve).
 */
#include "mp.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

enum { F_DEF = 1, F_TASK, F_CLEAR, F_EXIT, F_RESULT, F_RETIRE, F_INITFAIL };
enum { V_NIL, V_FALSE, V_TRUE, V_INT, V_FLOAT, V_STR, V_CODEC };
enum { EV_CHAN, EV_SENTINEL, EV_TIMER };

#define RBUF_INIT 65536
#define READ_MAX (1u << 20)          /* bytes read per slot per wait */
#define QUICK_US 100                 /* a chunk this quick may wait to be sent */
#define BATCH_MAX 65536              /* bytes of results held back at most */
#define BATCH_AGE 0.001              /* seconds a result is held back at most */

/* One worker's record in shared memory (a cache line each). */
typedef struct shslot {
  uint32_t started;                  /* seq of the chunk last started */
  uint32_t ready;                    /* initializer done */
  uint32_t finished;                 /* seq of the chunk last finished */
  uint32_t pad[13];
} shslot;

typedef struct slot {
  int fd;                            /* parent's end; -1 when none */
  int wfd;                           /* worker's end until the fork */
  int pidfd;                         /* sentinel in the epoll set (not ours) */
  int eof, dead, wantout, active;
  int building;                      /* a frame was being built: discard */
  size_t frame_start;
  mp_buf out;
  size_t outpos;                     /* pending: out.data[outpos .. len) */
  mp_buf in;
  size_t inpos;                      /* unread: in.data[inpos .. len) */
  const char *cur, *curend;          /* items of the last RESULT frame */
  uint32_t curn;
} slot;

typedef struct pcore {
  struct pcore *next, **prevp;       /* the live pools (all_pools) */
  int owner;                         /* pid of the process that made it */
  int n, closed;
  int epfd, tfd;
  int shmfd;                         /* the page's memfd (spawn, forkserver) */
  shslot *shm;
  size_t shmsize;
  slot s[];
} pcore;

/* Every PoolCore of this process not released yet: a forked worker closes
   the others' fds (drop_inherited). */
static pcore *all_pools;
static pthread_mutex_t all_pools_lock = PTHREAD_MUTEX_INITIALIZER;

static void pools_link(pcore *pc) {
  pthread_mutex_lock(&all_pools_lock);
  pc->next = all_pools;
  if (all_pools) all_pools->prevp = &pc->next;
  pc->prevp = &all_pools;
  all_pools = pc;
  pthread_mutex_unlock(&all_pools_lock);
}

/* lock = 0 in a forked child: it has one thread, and the lock may have
   been copied held by another */
static void pools_unlink(pcore *pc, int lock) {
  if (!pc->prevp) return;
  if (lock) pthread_mutex_lock(&all_pools_lock);
  *pc->prevp = pc->next;
  if (pc->next) pc->next->prevp = pc->prevp;
  pc->next = NULL;
  pc->prevp = NULL;
  if (lock) pthread_mutex_unlock(&all_pools_lock);
}

/* ---- buffers (malloc'd, owned by the userdata) --------------------- */

static void buf_free(mp_buf *b) {
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}

static void put_u8(lua_State *L, mp_buf *b, int v) {
  unsigned char c = (unsigned char)v;
  mp_buf_add(L, b, &c, 1);
}

static void put_u32(lua_State *L, mp_buf *b, uint32_t v) {
  mp_buf_add(L, b, &v, 4);
}

static void wr_u32(char *p, uint32_t v) {
  memcpy(p, &v, 4);
}

static uint32_t rd_u32(const char *p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}

/* Append the value at idx; plain values here, the rest by the codec. */
static void put_value(lua_State *L, mp_buf *b, int idx) {
  switch (lua_type(L, idx)) {
  case LUA_TNIL: put_u8(L, b, V_NIL); break;
  case LUA_TBOOLEAN: put_u8(L, b, lua_toboolean(L, idx) ? V_TRUE : V_FALSE); break;
  case LUA_TNUMBER: {
    char *w = mp_buf_reserve(L, b, 9);
    if (lua_isinteger(L, idx)) {
      lua_Integer i = lua_tointeger(L, idx);
      w[0] = V_INT;
      memcpy(w + 1, &i, 8);
    } else {
      lua_Number d = lua_tonumber(L, idx);
      w[0] = V_FLOAT;
      memcpy(w + 1, &d, 8);
    }
    b->len += 9;
    break;
  }
  case LUA_TSTRING: {
    size_t n;
    const char *s = lua_tolstring(L, idx, &n);
    char *w;
    if (n > UINT32_MAX) luaL_error(L, "string too large for a pool message");
    w = mp_buf_reserve(L, b, 5 + n);
    w[0] = V_STR;
    wr_u32(w + 1, (uint32_t)n);
    memcpy(w + 5, s, n);
    b->len += 5 + n;
    break;
  }
  default: {
    size_t at;
    idx = lua_absindex(L, idx);
    put_u8(L, b, V_CODEC);
    at = b->len;
    put_u32(L, b, 0);
    mp_encode(L, idx, b, NULL);
    wr_u32(b->data + at, (uint32_t)(b->len - at - 4));
    break;
  }
  }
}

static const char *corrupt(lua_State *L) {
  luaL_error(L, "pool: corrupt message");
  return NULL;
}

/* Push the value at p; returns the position after it. */
static const char *get_value(lua_State *L, const char *p, const char *end) {
  uint32_t n;
  if (p >= end) return corrupt(L);
  switch (*p++) {
  case V_NIL: lua_pushnil(L); return p;
  case V_FALSE: lua_pushboolean(L, 0); return p;
  case V_TRUE: lua_pushboolean(L, 1); return p;
  case V_INT: {
    lua_Integer i;
    if (end - p < 8) return corrupt(L);
    memcpy(&i, p, 8);
    lua_pushinteger(L, i);
    return p + 8;
  }
  case V_FLOAT: {
    lua_Number d;
    if (end - p < 8) return corrupt(L);
    memcpy(&d, p, 8);
    lua_pushnumber(L, d);
    return p + 8;
  }
  case V_STR:
    if (end - p < 4) return corrupt(L);
    n = rd_u32(p);
    p += 4;
    if ((size_t)(end - p) < n) return corrupt(L);
    lua_pushlstring(L, p, n);
    return p + n;
  case V_CODEC:
    if (end - p < 4) return corrupt(L);
    n = rd_u32(p);
    p += 4;
    if ((size_t)(end - p) < n) return corrupt(L);
    mp_decode(L, p, n, NULL, 0);
    return p + n;
  default:
    return corrupt(L);
  }
}

/* ---- the PoolCore object ------------------------------------------- */

static pcore *to_pcore(lua_State *L, int i) {
  return (pcore *)luaL_checkudata(L, i, MP_POOL_T);
}

static pcore *check_pcore(lua_State *L, int i) {
  pcore *pc = to_pcore(L, i);
  if (pc->closed) luaL_error(L, "pool is closed");
  return pc;
}

static slot *check_slot(lua_State *L, pcore *pc, int i) {
  lua_Integer k = luaL_checkinteger(L, i);
  luaL_argcheck(L, k >= 1 && k <= pc->n, i, "no such worker slot");
  return &pc->s[k - 1];
}

static void slot_release(pcore *pc, slot *s) {
  if (s->fd >= 0) {
    if (pc->epfd >= 0) epoll_ctl(pc->epfd, EPOLL_CTL_DEL, s->fd, NULL);
    close(s->fd);
  }
  if (s->pidfd >= 0 && pc->epfd >= 0)
    epoll_ctl(pc->epfd, EPOLL_CTL_DEL, s->pidfd, NULL);
  if (s->wfd >= 0) close(s->wfd);
  buf_free(&s->out);
  buf_free(&s->in);
  memset(s, 0, sizeof *s);
  s->fd = s->wfd = s->pidfd = -1;
}

static void pcore_release(pcore *pc) {
  int i;
  if (pc->closed) return;
  pools_unlink(pc, pc->owner == mp_getpid());
  for (i = 0; i < pc->n; i++) slot_release(pc, &pc->s[i]);
  if (pc->epfd >= 0) close(pc->epfd);
  if (pc->tfd >= 0) close(pc->tfd);
  if (pc->shmfd >= 0) close(pc->shmfd);
  if (pc->shm) mp_shm_unmap(pc->shm, pc->shmsize);
  pc->epfd = pc->tfd = pc->shmfd = -1;
  pc->shm = NULL;
  pc->closed = 1;
}

static int ep_add(pcore *pc, int fd, uint32_t events, int slotno, int kind) {
  struct epoll_event ev;
  memset(&ev, 0, sizeof ev);
  ev.events = events;
  ev.data.u64 = ((uint64_t)slotno << 2) | (uint64_t)kind;
  return epoll_ctl(pc->epfd, EPOLL_CTL_ADD, fd, &ev);
}

/* core.pool_new(n [, keepfd]) -> PoolCore with n worker slots; keepfd:
   keep the shared page's memfd, for workers that are not forked */
static int pool_new(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  int keepfd = lua_toboolean(L, 2);
  pcore *pc;
  int i, shmfd;
  luaL_argcheck(L, n >= 1 && n <= 4096, 1, "processes must be in 1..4096");
  pc = (pcore *)lua_newuserdatauv(L, sizeof(pcore) + sizeof(slot) * (size_t)n, 0);
  memset(pc, 0, sizeof(pcore) + sizeof(slot) * (size_t)n);
  pc->n = (int)n;
  pc->epfd = pc->tfd = pc->shmfd = -1;
  pc->closed = 1;                        /* nothing to release yet */
  for (i = 0; i < pc->n; i++) pc->s[i].fd = pc->s[i].wfd = pc->s[i].pidfd = -1;
  luaL_setmetatable(L, MP_POOL_T);
  pc->closed = 0;
  pc->owner = mp_getpid();
  pools_link(pc);
  pc->epfd = epoll_create1(EPOLL_CLOEXEC);
  if (pc->epfd < 0) return luaL_error(L, "epoll_create1: %s", strerror(errno));
  pc->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (pc->tfd < 0) return luaL_error(L, "timerfd_create: %s", strerror(errno));
  if (ep_add(pc, pc->tfd, EPOLLIN, 0, EV_TIMER) != 0)
    return luaL_error(L, "epoll_ctl: %s", strerror(errno));
  pc->shmsize = sizeof(shslot) * (size_t)n;
  pc->shm = (shslot *)mp_shm_create(L, "mp-pool", pc->shmsize, 0, &shmfd);
  if (keepfd) pc->shmfd = shmfd;         /* for the workers' handles */
  else close(shmfd);                     /* the mapping stays */
  return 1;
}

/* pc:open(i): a new channel for slot i (before forking its worker) */
static int pool_open(lua_State *L) {
  pcore *pc = check_pcore(L, 1);
  slot *s = check_slot(L, pc, 2);
  int sv[2];
  slot_release(pc, s);
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
    return luaL_error(L, "socketpair: %s", strerror(errno));
  s->fd = sv[0];
  s->wfd = sv[1];
  fcntl(s->fd, F_SETFL, fcntl(s->fd, F_GETFL) | O_NONBLOCK);
  memset(&pc->shm[s - pc->s], 0, sizeof(shslot));
  return 0;
}

/* pc:forked(i, sentinel): the worker runs; watch its channel and sentinel */
static int pool_forked(lua_State *L) {
  pcore *pc = check_pcore(L, 1);
  slot *s = check_slot(L, pc, 2);
  int no = (int)(s - pc->s);
  if (s->wfd >= 0) close(s->wfd);
  s->wfd = -1;
  s->active = 1;
  if (s->fd >= 0 && ep_add(pc, s->fd, EPOLLIN, no, EV_CHAN) != 0)
    return luaL_error(L, "epoll_ctl: %s", strerror(errno));
  if (!lua_isnoneornil(L, 3)) {
    s->pidfd = (int)luaL_checkinteger(L, 3);
    if (ep_add(pc, s->pidfd, EPOLLIN, no, EV_SENTINEL) != 0) {
      s->pidfd = -1;
      return luaL_error(L, "epoll_ctl: %s", strerror(errno));
    }
  }
  return 0;
}

/* pc:close_slot(i): forget slot i (its worker has been reaped) */
static int pool_close_slot(lua_State *L) {
  pcore *pc = check_pcore(L, 1);
  slot_release(pc, check_slot(L, pc, 2));
  return 0;
}

static void flush_slot(pcore *pc, slot *s);

/* ---- parent: building frames --------------------------------------- */

/* A frame left half built by a raise is dropped before the next one. */
static void fr_begin(lua_State *L, slot *s, int kind) {
  if (s->fd < 0) luaL_error(L, "pool: worker channel is closed");
  if (s->building) {
    s->out.len = s->frame_start;
    s->building = 0;
  }
  if (s->outpos == s->out.len) s->outpos = s->out.len = 0;
  s->frame_start = s->out.len;
  s->building = 1;
  put_u32(L, &s->out, 0);
  put_u8(L, &s->out, kind);
}

static void fr_end(slot *s) {
  uint32_t n = (uint32_t)(s->out.len - s->frame_start - 4);
  memcpy(s->out.data + s->frame_start, &n, 4);
  s->building = 0;
}

/* pc:def(i, fnid, bytes): a function for slot i's cache */
static int pool_def(lua_State *L) {
  pcore *pc = check_pcore(L, 1);
  slot *s = check_slot(L, pc, 2);
  uint32_t id = (uint32_t)luaL_checkinteger(L, 3);
  size_t n;
  const char *p = luaL_checklstring(L, 4, &n);
  fr_begin(L, s, F_DEF);
  put_u32(L, &s->out, id);
  mp_buf_add(L, &s->out, p, n);
  fr_end(s);
  return 0;
}

/* pc:ctl(i, "exit" | "clear") */
static int pool_ctl(lua_State *L) {
  static const char *const kinds[] = {"exit", "clear", NULL};
  pcore *pc = check_pcore(L, 1);
  slot *s = check_slot(L, pc, 2);
  int k = luaL_checkoption(L, 3, NULL, kinds);
  if (s->fd < 0 || s->eof) return 0;
  fr_begin(L, s, k == 0 ? F_EXIT : F_CLEAR);
  fr_end(s);
  return 0;
}

/* pc:task(i, seq, fnid, star, list, a, b): items list[a..b] as one chunk;
   star: each item is a table of arguments (n = its .n or #) */
static int pool_task(lua_State *L) {
  pcore *pc = check_pcore(L, 1);
  slot *s = check_slot(L, pc, 2);
  uint32_t seq = (uint32_t)luaL_checkinteger(L, 3);
  uint32_t fnid = (uint32_t)luaL_checkinteger(L, 4);
  int star = lua_toboolean(L, 5);
  lua_Integer a = luaL_checkinteger(L, 7), b = luaL_checkinteger(L, 8), k;
  luaL_checktype(L, 6, LUA_TTABLE);
  luaL_argcheck(L, a >= 1 && b >= a && b - a < (lua_Integer)UINT32_MAX, 7,
                "bad chunk range");
  lua_settop(L, 8);
  fr_begin(L, s, F_TASK);
  put_u32(L, &s->out, seq);
  put_u32(L, &s->out, fnid);
  put_u32(L, &s->out, (uint32_t)(b - a + 1));
  for (k = a; k <= b; k++) {
    int t = lua_rawgeti(L, 6, k);                 /* item */
    if (!star) {
      if (t == LUA_TNUMBER) {                     /* the common case, inline */
        char *w = mp_buf_reserve(L, &s->out, 13);
        wr_u32(w, 1);
        if (lua_isinteger(L, 9)) {
          lua_Integer i = lua_tointeger(L, 9);
          w[4] = V_INT;
          memcpy(w + 5, &i, 8);
        } else {
          lua_Number d = lua_tonumber(L, 9);
          w[4] = V_FLOAT;
          memcpy(w + 5, &d, 8);
        }
        s->out.len += 13;
      } else {
        put_u32(L, &s->out, 1);
        put_value(L, &s->out, 9);
      }
    } else {
      lua_Integer argc, j;
      if (lua_type(L, 9) != LUA_TTABLE)
        return luaL_error(L, "arguments of task %d must be a table (got %s)",
                          (int)k, luaL_typename(L, 9));
      if (lua_getfield(L, 9, "n") == LUA_TNUMBER) argc = lua_tointeger(L, -1);
      else argc = (lua_Integer)lua_rawlen(L, 9);
      lua_pop(L, 1);
      if (argc < 0 || argc > 250)
        return luaL_error(L, "task %d has too many arguments", (int)k);
      put_u32(L, &s->out, (uint32_t)argc);
      for (j = 1; j <= argc; j++) {
        lua_rawgeti(L, 9, j);
        put_value(L, &s->out, 10);
        lua_pop(L, 1);
      }
    }
    lua_pop(L, 1);
  }
  fr_end(s);
  if (s->out.len - s->outpos >= 32768) flush_slot(pc, s);   /* start it now */
  return 0;
}

/* ---- parent: moving bytes ------------------------------------------ */

static void set_wantout(pcore *pc, slot *s, int want) {
  struct epoll_event ev;
  if (s->wantout == want || s->fd < 0 || !s->active) return;
  memset(&ev, 0, sizeof ev);
  ev.events = EPOLLIN | (want ? EPOLLOUT : 0);
  ev.data.u64 = ((uint64_t)(s - pc->s) << 2) | EV_CHAN;
  if (epoll_ctl(pc->epfd, EPOLL_CTL_MOD, s->fd, &ev) == 0) s->wantout = want;
}

/* Write what the peer takes now. */
static void flush_slot(pcore *pc, slot *s) {
  size_t end = s->building ? s->frame_start : s->out.len;
  while (s->outpos < end && s->fd >= 0) {
    ssize_t r = send(s->fd, s->out.data + s->outpos, end - s->outpos,
                     MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      /* EPIPE, ECONNRESET: it is gone. Drop what it will never read, but
         keep reading: its last results may still be in the socket. */
      s->outpos = end;
      break;
    }
    s->outpos += (size_t)r;
  }
  if (s->outpos == s->out.len) s->outpos = s->out.len = 0;
  else if (s->outpos > 65536 && s->outpos * 2 > s->out.len) {
    memmove(s->out.data, s->out.data + s->outpos, s->out.len - s->outpos);
    s->out.len -= s->outpos;
    if (s->building) s->frame_start -= s->outpos;
    s->outpos = 0;
  }
  set_wantout(pc, s, s->outpos < (s->building ? s->frame_start : s->out.len));
}

/* Read what is there (up to READ_MAX). */
static void fill_slot(lua_State *L, slot *s) {
  size_t got = 0;
  if (s->fd < 0 || s->eof) return;
  if (s->inpos == s->in.len) s->inpos = s->in.len = 0;
  else if (s->inpos > 0 && s->in.cap - s->in.len < RBUF_INIT / 2) {
    memmove(s->in.data, s->in.data + s->inpos, s->in.len - s->inpos);
    s->in.len -= s->inpos;
    s->inpos = 0;
  }
  while (got < READ_MAX) {
    ssize_t r;
    if (s->in.cap - s->in.len < RBUF_INIT / 4) mp_buf_reserve(L, &s->in, RBUF_INIT);
    r = recv(s->fd, s->in.data + s->in.len, s->in.cap - s->in.len, MSG_DONTWAIT);
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) s->eof = 1;
      break;
    }
    if (r == 0) { s->eof = 1; break; }
    s->in.len += (size_t)r;
    got += (size_t)r;
    if (s->in.len < s->in.cap) break;    /* a short read: drained for now */
  }
  s->cur = s->curend = NULL;             /* the buffer may have moved */
}

/* pc:wait([timeout]) -> list of slots with news (input, end, sentinel),
   timer_fired. Flushes every pending output first. A wait that a signal
   interrupts lets the signal's hook run (mp_interrupted: lua5.4's Ctrl-C
   raises "interrupted!" here, so that pool:map and every other wait of the
   pool unwind at once; the books are whole between two waits) and
   otherwise resumes with the time that is left. */
static int pool_wait(lua_State *L) {
  pcore *pc = check_pcore(L, 1);
  double deadline = mp_deadline(mp_opttimeout(L, 2));
  struct epoll_event evs[64];
  int i, r, k = 0, timer = 0;
  for (i = 0; i < pc->n; i++)
    if (pc->s[i].fd >= 0 && pc->s[i].out.len > pc->s[i].outpos)
      flush_slot(pc, &pc->s[i]);
  for (;;) {
    r = epoll_wait(pc->epfd, evs, 64, mp_remaining_ms(deadline));
    if (r >= 0 || errno != EINTR) break;
    if (mp_interrupted(L)) return lua_error(L);
    if (mp_remaining_ms(deadline) == 0) break;
  }
  if (r < 0) r = 0;
  lua_createtable(L, r, 0);
  for (i = 0; i < r; i++) {
    int no = (int)(evs[i].data.u64 >> 2), kind = (int)(evs[i].data.u64 & 3);
    slot *s;
    if (kind == EV_TIMER) {
      uint64_t x;
      if (read(pc->tfd, &x, sizeof x) < 0) { /* nothing: spurious */ }
      timer = 1;
      continue;
    }
    if (no < 0 || no >= pc->n) continue;
    s = &pc->s[no];
    if (kind == EV_SENTINEL) s->dead = 1;
    else {
      if (evs[i].events & EPOLLOUT) flush_slot(pc, s);
      if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) fill_slot(L, s);
    }
    lua_pushinteger(L, no + 1);
    lua_rawseti(L, -2, ++k);
  }
  lua_pushboolean(L, timer);
  return 2;
}

/* pc:flush(): write what the workers take now */
static int pool_flush(lua_State *L) {
  pcore *pc = check_pcore(L, 1);
  int i;
  for (i = 0; i < pc->n; i++)
    if (pc->s[i].fd >= 0 && pc->s[i].out.len > pc->s[i].outpos)
      flush_slot(pc, &pc->s[i]);
  return 0;
}

/* pc:fill(i) -> ended: read all that is there now (draining a dead
   worker's channel); ended once the peer's end is closed */
static int pool_fill(lua_State *L) {
  pcore *pc = check_pcore(L, 1);
  slot *s = check_slot(L, pc, 2);
  size_t before;
  do {
    before = s->in.len - s->inpos;
    fill_slot(L, s);
  } while (!s->eof && s->in.len - s->inpos > before);
  lua_pushboolean(L, s->eof || s->fd < 0);
  return 1;
}

/* pc:state(i) -> ended, sentinel fired, bytes unread, bytes unsent */
static int pool_state(lua_State *L) {
  pcore *pc = check_pcore(L, 1);
  slot *s = check_slot(L, pc, 2);
  lua_pushboolean(L, s->eof || s->fd < 0);
  lua_pushboolean(L, s->dead);
  lua_pushinteger(L, (lua_Integer)(s->in.len - s->inpos));
  lua_pushinteger(L, (lua_Integer)(s->out.len - s->outpos));
  return 4;
}

/* pc:next(i) -> "result", seq, n, us | "retire" | "initfail", err | nil:
   the next whole frame from slot i; a result's items stay for take */
static int pool_next(lua_State *L) {
  pcore *pc = check_pcore(L, 1);
  slot *s = check_slot(L, pc, 2);
  const char *p = s->in.data + s->inpos, *body;
  size_t have = s->in.len - s->inpos;
  uint32_t len;
  s->cur = s->curend = NULL;
  if (have < 4) return 0;
  len = rd_u32(p);
  if (len < 1) return corrupt(L), 0;
  if (have - 4 < len) {                  /* make room for a large frame */
    if (s->inpos > 0) {
      memmove(s->in.data, p, have);
      s->in.len = have;
      s->inpos = 0;
    }
    mp_buf_reserve(L, &s->in, (size_t)len + 4 - have + RBUF_INIT / 4);
    return 0;
  }
  body = p + 5;
  s->inpos += 4 + (size_t)len;
  switch (p[4]) {
  case F_RESULT:
    if (len < 13) return corrupt(L), 0;
    lua_pushliteral(L, "result");
    lua_pushinteger(L, rd_u32(body));
    lua_pushinteger(L, rd_u32(body + 4));
    lua_pushinteger(L, rd_u32(body + 8));
    s->cur = body + 12;
    s->curend = p + 4 + len;
    s->curn = rd_u32(body + 4);
    return 4;
  case F_RETIRE:
    lua_pushliteral(L, "retire");
    return 1;
  case F_INITFAIL:
    lua_pushliteral(L, "initfail");
    get_value(L, body, p + 4 + len);
    return 2;
  default:
    return corrupt(L), 0;
  }
}

/* pc:take(i, results, pos, packed) -> nerr, errs | nil: the items of the
   last result frame go to results[pos ..]: the first value of each, or
   (packed) a table.pack of its values; errs[k] is the error of item k */
static int pool_take(lua_State *L) {
  pcore *pc = check_pcore(L, 1);
  slot *s = check_slot(L, pc, 2);
  lua_Integer pos = luaL_checkinteger(L, 4);
  int packed = lua_toboolean(L, 5), nerr = 0;
  const char *p = s->cur, *end = s->curend;
  uint32_t k;
  luaL_checktype(L, 3, LUA_TTABLE);
  lua_settop(L, 5);
  lua_pushnil(L);                        /* 6: errs */
  if (p == NULL) return luaL_error(L, "pool: no result to take");
  s->cur = s->curend = NULL;
  for (k = 0; k < s->curn; k++) {
    if (p >= end) return corrupt(L), 0;
    if (!packed && end - p >= 14 && p[0] == 0 && p[5] == V_INT &&
        rd_u32(p + 1) == 1) {                    /* one integer: inline */
      lua_Integer v;
      memcpy(&v, p + 6, 8);
      lua_pushinteger(L, v);
      lua_rawseti(L, 3, pos + (lua_Integer)k);
      p += 14;
      continue;
    }
    if (*p++ == 0) {
      uint32_t c, j;
      if (end - p < 4) return corrupt(L), 0;
      c = rd_u32(p);
      p += 4;
      if (c > 255) return corrupt(L), 0;
      if (packed) {
        lua_createtable(L, (int)c, 1);
        for (j = 1; j <= c; j++) {
          p = get_value(L, p, end);
          lua_rawseti(L, -2, j);
        }
        lua_pushinteger(L, c);
        lua_setfield(L, -2, "n");
      } else if (c == 0) {
        lua_pushnil(L);
      } else {
        p = get_value(L, p, end);
        for (j = 2; j <= c; j++) {       /* skip the other values */
          p = get_value(L, p, end);
          lua_pop(L, 1);
        }
      }
      lua_rawseti(L, 3, pos + (lua_Integer)k);
    } else {
      if (nerr++ == 0) {
        lua_newtable(L);
        lua_replace(L, 6);
      }
      p = get_value(L, p, end);
      lua_rawseti(L, 6, (lua_Integer)k + 1);
    }
  }
  lua_pushinteger(L, nerr);
  lua_pushvalue(L, 6);
  return 2;
}

/* pc:started(i) -> seq of the chunk the worker last started, of the one
   it last finished, initializer done */
static int pool_started(lua_State *L) {
  pcore *pc = check_pcore(L, 1);
  slot *s = check_slot(L, pc, 2);
  shslot *sh = &pc->shm[s - pc->s];
  lua_pushinteger(L, __atomic_load_n(&sh->started, __ATOMIC_ACQUIRE));
  lua_pushinteger(L, __atomic_load_n(&sh->finished, __ATOMIC_ACQUIRE));
  lua_pushboolean(L, __atomic_load_n(&sh->ready, __ATOMIC_ACQUIRE) != 0);
  return 3;
}

/* pc:timer(seconds | nil): arm the timerfd that far ahead (nil: disarm) */
static int pool_timer(lua_State *L) {
  pcore *pc = check_pcore(L, 1);
  struct itimerspec its;
  memset(&its, 0, sizeof its);
  if (!lua_isnoneornil(L, 2)) {
    double t = luaL_checknumber(L, 2);
    if (t < 1e-6) t = 1e-6;              /* zero would disarm it */
    its.it_value.tv_sec = (time_t)t;
    its.it_value.tv_nsec = (long)((t - (double)(time_t)t) * 1e9);
  }
  timerfd_settime(pc->tfd, 0, &its, NULL);
  return 0;
}

/* pc:fileno() -> fd (epoll) readable when the pool has news */
static int pool_fileno(lua_State *L) {
  lua_pushinteger(L, check_pcore(L, 1)->epfd);
  return 1;
}

/* pc:close(): release every fd and buffer; may be called twice */
static int pool_close(lua_State *L) {
  pcore_release(to_pcore(L, 1));
  return 0;
}

/* Close the fds of every slot but me's write end (me = -1: all), the
   epoll set, the timer and the memfd: what a worker inherited. */
static void close_others(pcore *pc, int me) {
  int i;
  for (i = 0; i < pc->n; i++) {
    slot *s = &pc->s[i];
    if (s->fd >= 0) close(s->fd);
    if (i != me && s->wfd >= 0) close(s->wfd);
    if (s->pidfd >= 0) close(s->pidfd);
    s->fd = s->pidfd = -1;
    if (i != me) s->wfd = -1;
    buf_free(&s->out);
    buf_free(&s->in);
  }
  if (pc->epfd >= 0) close(pc->epfd);
  if (pc->tfd >= 0) close(pc->tfd);
  if (pc->shmfd >= 0) close(pc->shmfd);
  pc->epfd = pc->tfd = pc->shmfd = -1;
}

/* In a forked child, drop pc's fds and mapping (the child's copy). */
static void child_close(pcore *pc) {
  if (pc->closed) return;
  pools_unlink(pc, 0);
  close_others(pc, -1);
  if (pc->shm) mp_shm_unmap(pc->shm, pc->shmsize);
  pc->shm = NULL;
  pc->closed = 1;
}

/* In slot me's forked worker: drop what it inherited and must not hold,
   every other pool of this process and pc's channels but its own end
   (again: nothing). The list may be mid-change only if another thread of
   the parent held its lock at the fork: the other pools then stay open. */
static void drop_inherited(pcore *pc, int me) {
  pcore *o, *next;
  if (pthread_mutex_trylock(&all_pools_lock) == 0) {
    pthread_mutex_unlock(&all_pools_lock);   /* one thread here: no need */
    for (o = all_pools; o; o = next) {
      next = o->next;
      if (o != pc) child_close(o);
    }
  }
  close_others(pc, me);
}

/* pc:drop_inherited(i): in slot i's forked worker, before anything else
   (see drop_inherited) */
static int pool_drop_inherited(lua_State *L) {
  pcore *pc = to_pcore(L, 1);
  drop_inherited(pc, (int)(check_slot(L, pc, 2) - pc->s));
  return 0;
}

/* ---- the worker ----------------------------------------------------- */

typedef struct wctx {
  const char *p, *end;                   /* unread items of the chunk */
  uint32_t k, n;                         /* next item, items */
  mp_buf *out;
  size_t item_start;
} wctx;

/* The runner: items ctx->k .. n-1 of a chunk, called under lua_pcall with
   (fn, ctx); an item that raises ends this call, the loop resumes after it. */
static int pool_runner(lua_State *L) {
  wctx *c = (wctx *)lua_touserdata(L, 2);
  while (c->k < c->n) {
    uint32_t argc, j;
    int nres, top, i;
    if (c->end - c->p < 4) return corrupt(L), 0;
    argc = rd_u32(c->p);
    c->p += 4;
    if (argc > 250) return corrupt(L), 0;
    luaL_checkstack(L, (int)argc + 8, "too many arguments");
    c->item_start = c->out->len;
    c->k++;
    lua_settop(L, 2);
    lua_pushvalue(L, 1);
    if (argc == 1 && c->end - c->p >= 9 && c->p[0] == V_INT) {   /* inline */
      lua_Integer v;
      memcpy(&v, c->p + 1, 8);
      lua_pushinteger(L, v);
      c->p += 9;
    } else {
      for (j = 0; j < argc; j++) c->p = get_value(L, c->p, c->end);
    }
    lua_call(L, (int)argc, LUA_MULTRET);
    top = lua_gettop(L);
    nres = top - 2;
    if (nres == 1 && lua_isinteger(L, 3)) {      /* the common case, inline */
      lua_Integer v = lua_tointeger(L, 3);
      char *w = mp_buf_reserve(L, c->out, 14);
      w[0] = 0;
      wr_u32(w + 1, 1);
      w[5] = V_INT;
      memcpy(w + 6, &v, 8);
      c->out->len += 14;
      continue;
    }
    if (nres > 255) luaL_error(L, "a task may return at most 255 values");
    put_u8(L, c->out, 0);
    put_u32(L, c->out, (uint32_t)nres);
    for (i = 3; i <= top; i++) put_value(L, c->out, i);
  }
  return 0;
}

static int write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t r = send(fd, p, n, MSG_NOSIGNAL);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    p += r;
    n -= (size_t)r;
  }
  return 0;
}

/* Does the buffer hold a whole frame at pos? */
static int frame_ready(const mp_buf *in, size_t pos) {
  size_t have = in->len - pos;
  return have >= 4 && have - 4 >= rd_u32(in->data + pos);
}

/* Read until the buffer holds a whole frame; 0 at end of stream. */
static int read_frame(lua_State *L, int fd, mp_buf *in, size_t *pos) {
  for (;;) {
    size_t have = in->len - *pos;
    if (have >= 4 && have - 4 >= rd_u32(in->data + *pos)) return 1;
    if (*pos > 0) {
      memmove(in->data, in->data + *pos, have);
      in->len = have;
      *pos = 0;
    }
    if (have >= 4) mp_buf_reserve(L, in, rd_u32(in->data) + 4 - have);
    if (in->cap - in->len < 4096) mp_buf_reserve(L, in, RBUF_INIT);
    {
      ssize_t r = recv(fd, in->data + in->len, in->cap - in->len, 0);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return 0;
      in->len += (size_t)r;
    }
  }
}

static void frame_begin(lua_State *L, mp_buf *b, int kind) {
  b->len = 0;
  put_u32(L, b, 0);
  put_u8(L, b, kind);
}

static int frame_send(mp_buf *b, int fd) {
  wr_u32(b->data, (uint32_t)(b->len - 4));
  return write_all(fd, b->data, b->len);
}


/* Send an INITFAIL frame with the error at idx on fd. */
static void send_initfail(lua_State *L, int fd, int idx) {
  mp_buf *b;
  idx = lua_absindex(L, idx);
  b = mp_buf_push(L, 256);
  frame_begin(L, b, F_INITFAIL);
  put_value(L, b, idx);
  if (fd >= 0) frame_send(b, fd);
  lua_pop(L, 1);
}

/* pc:initfail(i, err): in the worker, report that the initializer raised */
static int pool_initfail(lua_State *L) {
  pcore *pc = to_pcore(L, 1);
  slot *s = check_slot(L, pc, 2);
  lua_settop(L, 3);                      /* pc, i, err */
  send_initfail(L, s->wfd, 3);
  return 0;
}

/* The worker's loop: serve the channel fd until EXIT, its end, maxtasks
   tasks or a heap above maxmem bytes after a chunk, recording progress in
   sh. The message handler is at stack index 5 (nothing above it). Returns
   when the worker should leave; closes nothing. */
static void serve(lua_State *L, int fd, shslot *sh, lua_Integer maxtasks,
                  double maxmem) {
  lua_Integer done = 0;
  size_t pos = 0, fstart;
  double held_since = 0;
  mp_buf *in, *out;
  signal(SIGINT, SIG_IGN);               /* Ctrl-C is the parent's business */
  in = mp_buf_push(L, RBUF_INIT);        /* 6 */
  out = mp_buf_push(L, RBUF_INIT);       /* 7 */
  lua_newtable(L);                       /* 8: fnid -> function */
  __atomic_store_n(&sh->ready, 1, __ATOMIC_RELEASE);
  for (;;) {
    if (!frame_ready(in, pos) && out->len > 0) {   /* about to wait: send */
      if (write_all(fd, out->data, out->len) != 0) break;
      out->len = 0;
    }
    if (!read_frame(L, fd, in, &pos)) break;
    {
    const char *p = in->data + pos;
    uint32_t len = rd_u32(p);
    const char *body = p + 5, *end = p + 4 + len;
    int kind = len >= 1 ? p[4] : 0;
    pos += 4 + (size_t)len;
    if (kind == F_EXIT) break;
    if (kind == F_CLEAR) {
      lua_newtable(L);
      lua_replace(L, 8);
    } else if (kind == F_DEF && len >= 5) {
      mp_decode(L, body + 4, (size_t)(end - body - 4), NULL, 0);
      lua_rawseti(L, 8, rd_u32(body));
    } else if (kind == F_TASK && len >= 13) {
      wctx c;
      double t0 = mp_now(), us;
      uint32_t seq = rd_u32(body);
      __atomic_store_n(&sh->started, seq, __ATOMIC_RELEASE);
      c.p = body + 12;
      c.end = end;
      c.k = 0;
      c.n = rd_u32(body + 8);
      c.out = out;
      fstart = out->len;
      put_u32(L, out, 0);
      put_u8(L, out, F_RESULT);
      put_u32(L, out, seq);
      put_u32(L, out, c.n);
      put_u32(L, out, 0);
      lua_rawgeti(L, 8, rd_u32(body + 4));           /* 9: fn */
      if (lua_type(L, 9) != LUA_TFUNCTION) luaL_error(L, "pool: unknown function");
      while (c.k < c.n) {
        lua_pushcfunction(L, pool_runner);
        lua_pushvalue(L, 9);
        lua_pushlightuserdata(L, &c);
        if (lua_pcall(L, 2, 0, 5) != LUA_OK) {       /* item c.k-1 raised */
          out->len = c.item_start;
          put_u8(L, out, 1);
          put_value(L, out, -1);
          lua_pop(L, 1);
          if (c.k == 0) break;                       /* corrupt: give up */
        }
      }
      lua_settop(L, 8);
      done += c.n;
      us = (mp_now() - t0) * 1e6;
      wr_u32(out->data + fstart + 13, us > 4e9 ? 4000000000u : (uint32_t)us);
      wr_u32(out->data + fstart, (uint32_t)(out->len - fstart - 4));
      __atomic_store_n(&sh->finished, seq, __ATOMIC_RELEASE);
      /* A quick chunk with the next one already here: its result rides
         with the next ones (one write for many) */
      if (fstart == 0) held_since = t0;
      if (us < QUICK_US && out->len < BATCH_MAX && frame_ready(in, pos) &&
          mp_now() - held_since < BATCH_AGE && !(maxtasks > 0 && done >= maxtasks))
        continue;
      if (write_all(fd, out->data, out->len) != 0) break;
      out->len = 0;
      if (maxtasks > 0 && done >= maxtasks) break;
      if (maxmem > 0) {
        double bytes = lua_gc(L, LUA_GCCOUNT, 0) * 1024.0 + lua_gc(L, LUA_GCCOUNTB, 0);
        if (bytes > maxmem) {
          lua_gc(L, LUA_GCCOLLECT, 0);
          bytes = lua_gc(L, LUA_GCCOUNT, 0) * 1024.0 + lua_gc(L, LUA_GCCOUNTB, 0);
          if (bytes > maxmem) {
            if (out->len > 0 && write_all(fd, out->data, out->len) != 0) break;
            frame_begin(L, out, F_RETIRE);
            frame_send(out, fd);
            out->len = 0;
            break;
          }
        }
      }
    } else {
      luaL_error(L, "pool: corrupt message");
    }
    }
  }
  if (out->len > 0) write_all(fd, out->data, out->len);
  lua_settop(L, 5);
}

/* pc:worker(i, maxtasks, maxmem, msgh) -> exit code: in the forked worker,
   serve slot i's channel (see serve) */
static int pool_worker(lua_State *L) {
  pcore *pc = to_pcore(L, 1);
  slot *s = check_slot(L, pc, 2);
  lua_Integer maxtasks = luaL_optinteger(L, 3, 0);
  double maxmem = luaL_optnumber(L, 4, 0);
  int me = (int)(s - pc->s);
  luaL_checktype(L, 5, LUA_TFUNCTION);
  lua_settop(L, 5);                      /* 5: msgh (worker_main dropped the rest) */
  serve(L, s->wfd, &pc->shm[me], maxtasks, maxmem);
  if (s->wfd >= 0) close(s->wfd);
  s->wfd = -1;
  lua_pushinteger(L, 0);
  return 1;
}

/* The hook of a forked worker with no initializer (pc:lazy): before its
   bootstrap enters Lua, the worker drops what it must not hold (the other
   slots' channels, every other pool) and waits in C for its first frame.
   A worker whose first frame is EXIT, or whose channel ends, leaves at
   once as serve would (code 0) without running any Lua: such a worker
   writes almost no page, so costs a copy of almost none. Any other frame
   is left unread for serve. */
static void lazy_wait(void *arg, int me) {
  pcore *pc = (pcore *)arg;
  slot *s = &pc->s[me];
  unsigned char h[5];
  ssize_t r;
  signal(SIGINT, SIG_IGN);               /* as serve: the parent's business */
  drop_inherited(pc, me);
  __atomic_store_n(&pc->shm[me].ready, 1, __ATOMIC_RELEASE);
  /* (a peek returns what has come: a frame header that came in two
     pieces, which the parent's whole-frame writes do not make, would
     take the ordinary path) */
  do r = recv(s->wfd, h, sizeof h, MSG_PEEK);
  while (r < 0 && errno == EINTR);
  if (r == 0 || (r == (ssize_t)sizeof h && rd_u32((const char *)h) == 1 && h[4] == F_EXIT))
    _exit(0);
}

/* pc:lazy(i, p): slot i's worker, the forked Process p not started yet,
   waits for its first frame before it enters Lua (lazy_wait) */
static int pool_lazy(lua_State *L) {
  pcore *pc = check_pcore(L, 1);
  slot *s = check_slot(L, pc, 2);
  mp_process_set_hook(L, 3, lazy_wait, pc, (int)(s - pc->s));
  return 0;
}

/* ---- the worker's handle (spawn, forkserver) ------------------------

   A worker that is not forked cannot inherit the PoolCore: the parent
   gives it a PoolWorker handle instead, which the codec sends with the
   Process's arguments (kind "PoolWorker", state {slot, n}, the worker's
   end of the channel and the shared page's memfd, passed with SCM_RIGHTS).
   In the parent the handle is a view of the PoolCore's slot (kept in its
   user value) and owns nothing; the rebuilt one in the worker owns its
   channel fd and its mapping of the page. */

typedef struct pworker {
  int fd;                                /* rebuilt: the channel; -1 closed */
  int slot;                              /* 0-based */
  int view;                              /* the parent's view: owns nothing */
  shslot *shm;
  size_t shmsize;
} pworker;

static pworker *to_pworker(lua_State *L, int i) {
  return (pworker *)luaL_checkudata(L, i, MP_POOLWORKER_T);
}

static pworker *check_worker(lua_State *L, int i) {
  pworker *w = to_pworker(L, i);
  if (w->view) luaL_error(L, "this PoolWorker handle is the parent's view");
  if (w->fd < 0) luaL_error(L, "PoolWorker handle is closed");
  return w;
}

static pworker *pworker_push(lua_State *L) {
  pworker *w = (pworker *)lua_newuserdatauv(L, sizeof(pworker), 1);
  memset(w, 0, sizeof *w);
  w->fd = -1;
  luaL_setmetatable(L, MP_POOLWORKER_T);
  return w;
}

/* pc:_worker_handle(i) -> PoolWorker: the handle a worker of slot i that is
   not forked receives (between pc:open(i) and pc:forked(i)) */
static int pool_worker_handle(lua_State *L) {
  pcore *pc = check_pcore(L, 1);
  slot *s = check_slot(L, pc, 2);
  pworker *w;
  if (pc->shmfd < 0)
    return luaL_error(L, "pool: this PoolCore was made for forked workers");
  if (s->wfd < 0) return luaL_argerror(L, 2, "slot has no worker channel open");
  w = pworker_push(L);
  w->view = 1;
  w->slot = (int)(s - pc->s);
  lua_pushvalue(L, 1);
  lua_setiuservalue(L, -2, 1);           /* the view keeps the PoolCore */
  return 1;
}

/* __mp_reduce(w) -> "PoolWorker", {slot, n}, channel fd, page memfd */
static int pworker__reduce(lua_State *L) {
  pworker *w = to_pworker(L, 1);
  pcore *pc;
  slot *s;
  if (!w->view) return luaL_error(L, "a PoolWorker handle travels only from its pool");
  lua_getiuservalue(L, 1, 1);
  pc = (pcore *)luaL_checkudata(L, -1, MP_POOL_T);
  s = &pc->s[w->slot];
  if (pc->closed || s->wfd < 0 || pc->shmfd < 0)
    return mp_raise(L, "SerializationError",
                    "PoolWorker handle: its worker has been started already");
  lua_pushliteral(L, "PoolWorker");
  lua_createtable(L, 2, 0);
  lua_pushinteger(L, w->slot + 1);
  lua_rawseti(L, -2, 1);
  lua_pushinteger(L, pc->n);
  lua_rawseti(L, -2, 2);
  lua_pushinteger(L, s->wfd);
  lua_pushinteger(L, pc->shmfd);
  return 4;
}

/* The codec's rebuild: (state, fd, shmfd) -> PoolWorker owning fd and a
   mapping of the page (shmfd is closed once mapped). */
static int pworker_rebuild(lua_State *L) {
  int fd = (int)luaL_checkinteger(L, 2), shmfd = (int)luaL_checkinteger(L, 3);
  lua_Integer k = 0, n = 0;
  pworker *w;
  size_t size = 0;
  const char *why = NULL;
  void *p;
  if (lua_type(L, 1) == LUA_TTABLE) {
    lua_rawgeti(L, 1, 1);
    lua_rawgeti(L, 1, 2);
    k = lua_tointeger(L, -2);
    n = lua_tointeger(L, -1);
    lua_pop(L, 2);
  }
  w = pworker_push(L);                   /* closed until the fds are in */
  w->fd = fd;                            /* owned from here (even on error) */
  p = mp_shm_map(shmfd, sizeof(shslot), &size, &why);
  close(shmfd);
  if (p == NULL)
    return mp_raise(L, "SerializationError",
                    "PoolWorker: cannot map the pool's page: %s", why);
  w->shm = (shslot *)p;
  w->shmsize = size;
  if (k < 1 || k > n || n > (lua_Integer)(size / sizeof(shslot)))
    return mp_raise(L, "SerializationError", "PoolWorker: bad slot %d of %d",
                    (int)k, (int)n);
  w->slot = (int)(k - 1);
  return 1;
}

/* w:serve(maxtasks, maxmem, msgh) -> 0: in the worker, serve the channel
   (as pc:worker does in a forked one), then close it */
static int pworker_serve(lua_State *L) {
  pworker *w = check_worker(L, 1);
  lua_Integer maxtasks = luaL_optinteger(L, 2, 0);
  double maxmem = luaL_optnumber(L, 3, 0);
  luaL_checktype(L, 4, LUA_TFUNCTION);
  lua_settop(L, 4);
  lua_pushvalue(L, 4);                   /* 5: msgh, as serve wants it */
  serve(L, w->fd, &w->shm[w->slot], maxtasks, maxmem);
  close(w->fd);
  w->fd = -1;
  lua_pushinteger(L, 0);
  return 1;
}

/* w:initfail(err): in the worker, report that the initializer raised */
static int pworker_initfail(lua_State *L) {
  pworker *w = check_worker(L, 1);
  luaL_checkany(L, 2);
  send_initfail(L, w->fd, 2);
  return 0;
}

static int pworker__gc(lua_State *L) {
  pworker *w = to_pworker(L, 1);
  if (!w->view) {
    if (w->fd >= 0) close(w->fd);
    if (w->shm) mp_shm_unmap(w->shm, w->shmsize);
  }
  w->fd = -1;
  w->shm = NULL;
  return 0;
}

static int pworker__tostring(lua_State *L) {
  pworker *w = to_pworker(L, 1);
  lua_pushfstring(L, "<PoolWorker(slot %d%s)>", w->slot + 1,
                  w->view ? ", parent's view" : w->fd < 0 ? ", closed" : "");
  return 1;
}

/* core.pool_dumpfn(fn) -> bytes of fn for pc:def */
static int pool_dumpfn(lua_State *L) {
  mp_buf *b;
  luaL_checkany(L, 1);
  lua_settop(L, 1);
  b = mp_buf_push(L, 256);
  mp_encode_named(L, 1, b, NULL, "fn");
  lua_pushlstring(L, b->data, b->len);
  return 1;
}

/* core.pool_table(n) -> a table with room for n list items */
static int pool_table(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  lua_createtable(L, n > 0 && n < (1 << 26) ? (int)n : 0, 1);
  return 1;
}

static int pool__gc(lua_State *L) {
  pcore_release(to_pcore(L, 1));
  return 0;
}

static const luaL_Reg pool_methods[] = {
  {"open", pool_open},
  {"forked", pool_forked},
  {"close_slot", pool_close_slot},
  {"def", pool_def},
  {"ctl", pool_ctl},
  {"task", pool_task},
  {"wait", pool_wait},
  {"fill", pool_fill},
  {"flush", pool_flush},
  {"state", pool_state},
  {"next", pool_next},
  {"take", pool_take},
  {"started", pool_started},
  {"timer", pool_timer},
  {"fileno", pool_fileno},
  {"close", pool_close},
  {"drop_inherited", pool_drop_inherited},
  {"initfail", pool_initfail},
  {"worker", pool_worker},
  {"lazy", pool_lazy},
  {"_worker_handle", pool_worker_handle},
  {NULL, NULL}
};

static const luaL_Reg pworker_methods[] = {
  {"serve", pworker_serve},
  {"initfail", pworker_initfail},
  {"close", pworker__gc},
  {NULL, NULL}
};

MP_API void mp_pool_open(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"pool_new", pool_new},
    {"pool_dumpfn", pool_dumpfn},
    {"_pool_runner", pool_runner},
    {"pool_table", pool_table},
    {NULL, NULL}
  };
  static const luaL_Reg pool_meta[] = {
    {"__gc", pool__gc}, {"__close", pool__gc}, {NULL, NULL}
  };
  static const luaL_Reg pworker_meta[] = {
    {"__gc", pworker__gc}, {"__close", pworker__gc}, {"__tostring", pworker__tostring},
    {"__mp_reduce", pworker__reduce}, {NULL, NULL}
  };
  mp_newclass(L, MP_POOL_T, (const luaL_Reg *const[]){ pool_methods, NULL },
              pool_meta, NULL, NULL);
  lua_pop(L, 1);
  mp_newclass(L, MP_POOLWORKER_T, (const luaL_Reg *const[]){ pworker_methods, NULL },
              pworker_meta, NULL, NULL);
  lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
  /* the kind is known before any module is loaded (the codec opens first) */
  lua_getfield(L, -1, "register_handle");
  lua_pushliteral(L, "PoolWorker");
  lua_pushcfunction(L, pworker_rebuild);
  lua_call(L, 2, 0);
}
