/*
 * pool.c: the Pool's engine, the parent's side (docs/design.md, decisions
 * 6 and 7): one channel per worker slot, the parent's event set, and the
 * pool's frames and values (pool.h); the worker's side is pool_worker.c.
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
 * file moves bytes: it frames many tasks into one write and reads many
 * results per read. Every value goes through the codec (scalars by its
 * fast path, codec_scalar.c); frames are wire.c's, sent by its one send
 * loop. A frame whose values hold handles carries their fds (pool.h):
 * copies queued per slot with the offset of their frame's first byte
 * (pool_fdq, sent by mp_pool_send as the output is flushed), and the fds
 * read queued per slot until a frame claims them (pool_fifo); both sides
 * share these functions (pool_fds.c).
 */
#include "pool.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

enum { EV_CHAN, EV_SENTINEL, EV_TIMER };

#define READ_MAX (1u << 20)          /* bytes read per slot per wait */

/* Every PoolCore of this process not released yet: a forked worker closes
   the others' fds (mp_pool_drop_inherited). */
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

/* ---- values -------------------------------------------------------- */

static void put_u32(lua_State *L, mp_buf *b, uint32_t v) {
  mp_buf_add(L, b, &v, 4);
}

/* ---- the PoolCore object ------------------------------------------- */

/* a full userdata with our magic (mp_tomagic: no registry look-up) */
MP_API pcore *mp_pool_to(lua_State *L, int i) {
  pcore *pc = (pcore *)mp_tomagic(L, i, sizeof(pcore), POOL_MAGIC);
  if (__builtin_expect(pc != NULL, 1)) return pc;
  luaL_typeerror(L, i, MP_POOL_T);
  return NULL;
}

MP_API pcore *mp_pool_check(lua_State *L, int i) {
  pcore *pc = mp_pool_to(L, i);
  if (pc->closed) luaL_error(L, "pool is closed");
  return pc;
}

MP_API slot *mp_pool_slot(lua_State *L, pcore *pc, int i) {
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
  mp_buf_free(&s->out);
  mp_buf_free(&s->in);
  mp_pool_fdq_free(&s->oq);
  mp_pool_fifo_free(&s->ff);
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
  pc->magic = POOL_MAGIC;
  pc->n = (int)n;
  pc->epfd = pc->tfd = pc->shmfd = -1;
  pc->closed = 1;                        /* nothing to release yet */
  for (i = 0; i < pc->n; i++) pc->s[i].fd = pc->s[i].wfd = pc->s[i].pidfd = -1;
  luaL_setmetatable(L, MP_POOL_T);
  pc->closed = 0;
  pc->owner = mp_getpid();
  pools_link(pc);
  pc->epfd = epoll_create1(EPOLL_CLOEXEC);
  if (pc->epfd < 0) return mp_raise_errno(L, errno, "epoll_create1");
  pc->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (pc->tfd < 0) return mp_raise_errno(L, errno, "timerfd_create");
  if (ep_add(pc, pc->tfd, EPOLLIN, 0, EV_TIMER) != 0)
    return mp_raise_errno(L, errno, "epoll_ctl");
  pc->shmsize = sizeof(shslot) * (size_t)n;
  pc->shm = (shslot *)mp_shm_create(L, "mp-pool", pc->shmsize, 0, &shmfd);
  if (keepfd) pc->shmfd = shmfd;         /* for the workers' handles */
  else close(shmfd);                     /* the mapping stays */
  return 1;
}

/* pc:open(i): a new channel for slot i (before forking its worker) */
static int pool_open(lua_State *L) {
  pcore *pc = mp_pool_check(L, 1);
  slot *s = mp_pool_slot(L, pc, 2);
  int sv[2];
  slot_release(pc, s);
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
    return mp_raise_errno(L, errno, "socketpair");
  s->fd = sv[0];
  s->wfd = sv[1];
  fcntl(s->fd, F_SETFL, fcntl(s->fd, F_GETFL) | O_NONBLOCK);
  memset(&pc->shm[s - pc->s], 0, sizeof(shslot));
  return 0;
}

/* pc:forked(i, sentinel): the worker runs; watch its channel and sentinel */
static int pool_forked(lua_State *L) {
  pcore *pc = mp_pool_check(L, 1);
  slot *s = mp_pool_slot(L, pc, 2);
  int no = (int)(s - pc->s);
  if (s->wfd >= 0) close(s->wfd);
  s->wfd = -1;
  s->active = 1;
  if (s->fd >= 0 && ep_add(pc, s->fd, EPOLLIN, no, EV_CHAN) != 0)
    return mp_raise_errno(L, errno, "epoll_ctl");
  if (!lua_isnoneornil(L, 3)) {
    s->pidfd = (int)luaL_checkinteger(L, 3);
    if (ep_add(pc, s->pidfd, EPOLLIN, no, EV_SENTINEL) != 0) {
      s->pidfd = -1;
      return mp_raise_errno(L, errno, "epoll_ctl");
    }
  }
  return 0;
}

/* pc:close_slot(i): forget slot i (its worker has been reaped) */
static int pool_close_slot(lua_State *L) {
  pcore *pc = mp_pool_check(L, 1);
  slot_release(pc, mp_pool_slot(L, pc, 2));
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
    if (s->oq.g.len > 0) mp_pool_fdq_drop_from(&s->oq, s->frame_start);
  }
  if (s->outpos == s->out.len) s->outpos = s->out.len = 0;
  s->frame_start = s->out.len;
  s->building = 1;
  s->kind = kind;
  pool_frame_open(L, &s->out);
}

static void fr_end(slot *s) {
  pool_frame_close(&s->out, s->frame_start, (uint32_t)s->kind,
                   pool_fdq_count(&s->oq, s->frame_start));
  s->building = 0;
}

/* The copies of the fds of a function's handles that pool_dumpfn made,
   for the DEF frames that send it (MP_POOLFDS_T). */
#define MP_POOLFDS_T "multiprocessing.PoolFds"

static int poolfds__gc(lua_State *L) {
  mp_fdlist_close((mp_fdlist *)luaL_checkudata(L, 1, MP_POOLFDS_T));
  return 0;
}

/* pc:def(i, fnid, bytes [, fds]): a function for slot i's cache; fds:
   pool_dumpfn's second result */
static int pool_def(lua_State *L) {
  pcore *pc = mp_pool_check(L, 1);
  slot *s = mp_pool_slot(L, pc, 2);
  uint32_t id = (uint32_t)luaL_checkinteger(L, 3);
  size_t n;
  const char *p = luaL_checklstring(L, 4, &n);
  const mp_fdlist *fds = lua_isnoneornil(L, 5) ? NULL
                         : (const mp_fdlist *)luaL_checkudata(L, 5, MP_POOLFDS_T);
  int i;
  fr_begin(L, s, MP_FRAME_DEF);
  put_u32(L, &s->out, id);
  mp_buf_add(L, &s->out, p, n);
  for (i = 0; fds != NULL && i < fds->n; i++)   /* in order: the message's */
    mp_pool_fdq_add(L, &s->oq, s->frame_start, fds->fd[i]);
  fr_end(s);
  return 0;
}

/* pc:ctl(i, "exit" | "clear") */
static int pool_ctl(lua_State *L) {
  static const char *const kinds[] = {"exit", "clear", NULL};
  pcore *pc = mp_pool_check(L, 1);
  slot *s = mp_pool_slot(L, pc, 2);
  int k = luaL_checkoption(L, 3, NULL, kinds);
  if (s->fd < 0 || s->eof) return 0;
  fr_begin(L, s, k == 0 ? MP_FRAME_EXIT : MP_FRAME_CLEAR);
  fr_end(s);
  return 0;
}

/* Frame items list[a..b] (the list at index 6) as one TASK frame seq; the
   stack's top is base (an item goes at base + 1, a task's arguments table
   at base + 2). star: each item is a table of arguments (n = its .n or #) */
static void frame_task(lua_State *L, pcore *pc, slot *s, uint32_t seq, uint32_t fnid,
                       int star, lua_Integer a, lua_Integer b, int base) {
  const int item = base + 1, args = base + 2;
  lua_Integer k;
  fr_begin(L, s, MP_FRAME_TASK);
  put_u32(L, &s->out, seq);
  put_u32(L, &s->out, fnid);
  put_u32(L, &s->out, (uint32_t)(b - a + 1));
  for (k = a; k <= b; k++) {
    int t = lua_rawgeti(L, 6, k);                 /* item */
    if (!star) {
      if (s->out.cap - s->out.len < 4) mp_buf_reserve(L, &s->out, 4);
      pool_wr_u32(s->out.data + s->out.len, 1);
      s->out.len += 4;
      pool_put_value(L, &s->out, item, t, &s->oq, s->frame_start);
    } else {
      lua_Integer argc, j;
      size_t istart;
      if (lua_type(L, item) != LUA_TTABLE)
        luaL_error(L, "arguments of task %d must be a table (got %s)",
                   (int)k, luaL_typename(L, item));
      if (lua_getfield(L, item, "n") == LUA_TNUMBER) argc = lua_tointeger(L, -1);
      else argc = (lua_Integer)lua_rawlen(L, item);
      lua_pop(L, 1);
      if (argc < 0 || argc > 250)
        luaL_error(L, "task %d has too many arguments", (int)k);
      istart = s->out.len;
      put_u32(L, &s->out, (uint32_t)argc);
      for (j = 1; j <= argc; j++) {
        int ta = lua_rawgeti(L, item, j);
        if (ta != LUA_TNIL && ta != LUA_TBOOLEAN && ta != LUA_TNUMBER && ta != LUA_TSTRING) {
          lua_pop(L, 1);                 /* not all plain: one message */
          break;
        }
        pool_put_value(L, &s->out, args, ta, &s->oq, s->frame_start);
        lua_pop(L, 1);
      }
      if (j <= argc) {                   /* {args..., n = argc} as one value, so
                                            that a handle given twice is one */
        s->out.len = istart;
        put_u32(L, &s->out, POOL_ARGS_ONE);
        lua_createtable(L, (int)argc, 1);
        for (j = 1; j <= argc; j++) {
          lua_rawgeti(L, item, j);
          lua_rawseti(L, args, j);
        }
        lua_pushinteger(L, argc);
        lua_setfield(L, args, "n");
        pool_put_value(L, &s->out, args, LUA_TTABLE, &s->oq, s->frame_start);
        lua_pop(L, 1);
      }
    }
    lua_pop(L, 1);
  }
  fr_end(s);
  if (s->out.len - s->outpos >= 32768) flush_slot(pc, s);   /* start it now */
}

/* pc:tasks(i, seq, fnid, star, list, a, b, size) -> chunks: items
   list[a..b] cut into chunks of size items (one chunk: size = b - a + 1),
   framed as chunks seq, seq + 1, ... in one call (a chunksize-1 map's
   books cost less so). An item that cannot be serialized raises;
   pc:framed(i) then says how many chunks were framed whole before it. */
static int pool_tasks(lua_State *L) {
  pcore *pc = mp_pool_check(L, 1);
  slot *s = mp_pool_slot(L, pc, 2);
  uint32_t seq = (uint32_t)luaL_checkinteger(L, 3), fnid = (uint32_t)luaL_checkinteger(L, 4);
  int star = lua_toboolean(L, 5);
  lua_Integer a = luaL_checkinteger(L, 7), b = luaL_checkinteger(L, 8), size, n = 0;
  luaL_checktype(L, 6, LUA_TTABLE);
  luaL_argcheck(L, a >= 1 && b >= a && b - a < (lua_Integer)UINT32_MAX, 7,
                "bad chunk range");
  size = luaL_checkinteger(L, 9);
  luaL_argcheck(L, size >= 1, 9, "chunk size must be >= 1");
  lua_settop(L, 9);
  s->framed = 0;
  for (; a <= b; a += size) {
    frame_task(L, pc, s, seq + (uint32_t)n, fnid, star, a, b - a < size ? b : a + size - 1, 9);
    s->framed = (int)++n;
  }
  lua_pushinteger(L, n);
  return 1;
}

/* pc:framed(i) -> the chunks the last pc:tasks of slot i framed whole */
static int pool_framed(lua_State *L) {
  pcore *pc = mp_pool_to(L, 1);
  lua_pushinteger(L, mp_pool_slot(L, pc, 2)->framed);
  return 1;
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

/* Write what the peer takes now (whole frames: not one being built). */
static void flush_slot(pcore *pc, slot *s) {
  size_t end = s->building ? s->frame_start : s->out.len;
  if (s->outpos < end && s->fd >= 0) {
    int e = mp_pool_send(s->fd, &s->out, &s->outpos, end, &s->oq, MSG_DONTWAIT);
    if (e != 0 && e != EAGAIN && e != EWOULDBLOCK) {
      /* EPIPE, ECONNRESET: it is gone. Drop what it will never read, but
         keep reading: its last results may still be in the socket. */
      s->outpos = end;
      mp_pool_fdq_drop_before(&s->oq, end);
    }
  }
  if (s->outpos == s->out.len) {
    if (s->oq.g.len > 0) mp_pool_fdq_shift(&s->oq, s->outpos);
    s->outpos = s->out.len = 0;
  } else if (s->outpos > 65536 && s->outpos * 2 > s->out.len) {
    memmove(s->out.data, s->out.data + s->outpos, s->out.len - s->outpos);
    s->out.len -= s->outpos;
    if (s->building) s->frame_start -= s->outpos;
    mp_pool_fdq_shift(&s->oq, s->outpos);
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
    r = mp_pool_recv(L, s->fd, s->in.data + s->in.len, s->in.cap - s->in.len,
                     MSG_DONTWAIT, &s->ff);
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
  pcore *pc = mp_pool_check(L, 1);
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
  pcore *pc = mp_pool_check(L, 1);
  int i;
  for (i = 0; i < pc->n; i++)
    if (pc->s[i].fd >= 0 && pc->s[i].out.len > pc->s[i].outpos)
      flush_slot(pc, &pc->s[i]);
  return 0;
}

/* pc:fill(i) -> ended: read all that is there now (draining a dead
   worker's channel); ended once the peer's end is closed */
static int pool_fill(lua_State *L) {
  pcore *pc = mp_pool_check(L, 1);
  slot *s = mp_pool_slot(L, pc, 2);
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
  pcore *pc = mp_pool_check(L, 1);
  slot *s = mp_pool_slot(L, pc, 2);
  lua_pushboolean(L, s->eof || s->fd < 0);
  lua_pushboolean(L, s->dead);
  lua_pushinteger(L, (lua_Integer)(s->in.len - s->inpos));
  lua_pushinteger(L, (lua_Integer)(s->out.len - s->outpos));
  return 4;
}

/* pc:next(i) -> "result", seq, n, us | "retire" | "initfail", err | nil:
   the next whole frame from slot i; a result's items stay for take */
static int pool_next(lua_State *L) {
  pcore *pc = mp_pool_check(L, 1);
  slot *s = mp_pool_slot(L, pc, 2);
  const char *p = s->in.data + s->inpos, *body, *end;
  size_t have = s->in.len - s->inpos, len;
  mp_frame f;
  s->cur = s->curend = NULL;
  pool_unclaim(&s->ff);                  /* the last frame's fds */
  if (have == 0 && pool_fifo_unclaimed(&s->ff)) return mp_pool_corrupt(L);
  if (have < MP_FRAME_HDR) return 0;
  mp_frame_get(p, &f);
  if (f.nfds > MP_MAX_FDS || f.len > (uint64_t)SIZE_MAX / 4) return mp_pool_corrupt(L);
  len = (size_t)f.len;
  if (have - MP_FRAME_HDR < len) {       /* make room for a large frame */
    if (s->inpos > 0) {
      memmove(s->in.data, p, have);
      s->in.len = have;
      s->inpos = 0;
    }
    mp_buf_reserve(L, &s->in, len + MP_FRAME_HDR - have + RBUF_INIT / 4);
    return 0;
  }
  body = p + MP_FRAME_HDR;
  end = body + len;
  s->inpos += MP_FRAME_HDR + len;
  pool_claim(L, &s->ff, f.nfds);
  switch (f.kind) {
  case MP_FRAME_RESULT:
    if (len < 12) return mp_pool_corrupt(L);
    lua_pushliteral(L, "result");
    lua_pushinteger(L, pool_rd_u32(body));
    lua_pushinteger(L, pool_rd_u32(body + 4));
    lua_pushinteger(L, pool_rd_u32(body + 8));
    s->cur = body + 12;
    s->curend = end;
    s->curn = pool_rd_u32(body + 4);
    return 4;
  case MP_FRAME_RETIRE:
    lua_pushliteral(L, "retire");
    return 1;
  case MP_FRAME_INITFAIL:
    lua_pushliteral(L, "initfail");
    pool_get_value(L, body, end, &s->ff);
    return 2;
  default:
    return mp_pool_corrupt(L);
  }
}

/* The position after the value at p (< end), without keeping it (a
   message is not decoded; a plain value is read and dropped). */
static const char *skip_value(lua_State *L, const char *p, const char *end) {
  uint32_t n;
  if (p < end && ((unsigned char)*p == POOL_MSG || (unsigned char)*p == POOL_MSGFD)) {
    int fd = (unsigned char)*p == POOL_MSGFD;
    if (end - p < 5) return mp_pool_corrupt(L), NULL;
    n = pool_rd_u32(p + 1);
    if ((size_t)(end - p - 5) < n) return mp_pool_corrupt(L), NULL;
    p += 5 + n;
    if (fd) {                            /* its fds: closed with the frame's */
      if (p >= end || end - p - 1 < (unsigned char)*p) return mp_pool_corrupt(L), NULL;
      p += 1 + (unsigned char)*p;
    }
    return p;
  }
  p = pool_get_value(L, p, end, NULL);
  lua_pop(L, 1);
  return p;
}

/* pc:take(i, results, pos, packed) -> nerr, errs | nil: the items of the
   last result frame go to results[pos ..]: the first value of each, or
   (packed) a table.pack of its values; errs[k] is the error of item k */
static int pool_take(lua_State *L) {
  pcore *pc = mp_pool_check(L, 1);
  slot *s = mp_pool_slot(L, pc, 2);
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
    if (p >= end) return mp_pool_corrupt(L);
    if (*p++ == 0) {                     /* ok: u32 count, count values */
      uint32_t c, j;
      if (end - p < 4) return mp_pool_corrupt(L);
      c = pool_rd_u32(p);
      p += 4;
      if (c > 255) return mp_pool_corrupt(L);
      if (packed) {
        lua_createtable(L, (int)c, 1);
        for (j = 1; j <= c; j++) {
          p = pool_get_value(L, p, end, &s->ff);
          lua_rawseti(L, -2, j);
        }
        lua_pushinteger(L, c);
        lua_setfield(L, -2, "n");
      } else if (c == 0) {
        lua_pushnil(L);
      } else {
        p = pool_get_value(L, p, end, &s->ff);
        for (j = 2; j <= c; j++) p = skip_value(L, p, end);   /* the others */
      }
      lua_rawseti(L, 3, pos + (lua_Integer)k);
    } else {                             /* failed: the error value */
      if (nerr++ == 0) {
        lua_newtable(L);
        lua_replace(L, 6);
      }
      p = pool_get_value(L, p, end, &s->ff);
      lua_rawseti(L, 6, (lua_Integer)k + 1);
    }
  }
  pool_unclaim(&s->ff);                  /* every value took its copies */
  lua_pushinteger(L, nerr);
  lua_pushvalue(L, 6);
  return 2;
}

/* pc:started(i) -> seq of the chunk the worker last started, of the one
   it last finished, initializer done */
static int pool_started(lua_State *L) {
  pcore *pc = mp_pool_check(L, 1);
  slot *s = mp_pool_slot(L, pc, 2);
  shslot *sh = &pc->shm[s - pc->s];
  lua_pushinteger(L, __atomic_load_n(&sh->started, __ATOMIC_ACQUIRE));
  lua_pushinteger(L, __atomic_load_n(&sh->finished, __ATOMIC_ACQUIRE));
  lua_pushboolean(L, __atomic_load_n(&sh->ready, __ATOMIC_ACQUIRE) != 0);
  return 3;
}

/* pc:timer(seconds | nil): arm the timerfd that far ahead (nil: disarm) */
static int pool_timer(lua_State *L) {
  pcore *pc = mp_pool_check(L, 1);
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
  lua_pushinteger(L, mp_pool_check(L, 1)->epfd);
  return 1;
}

/* pc:close(): release every fd and buffer; may be called twice */
static int pool_close(lua_State *L) {
  pcore_release(mp_pool_to(L, 1));
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
    mp_buf_free(&s->out);
    mp_buf_free(&s->in);
    mp_pool_fdq_free(&s->oq);            /* copies of the parent's handles */
    mp_pool_fifo_free(&s->ff);
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
MP_API void mp_pool_drop_inherited(pcore *pc, int me) {
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
   (see mp_pool_drop_inherited) */
static int pool_drop_inherited(lua_State *L) {
  pcore *pc = mp_pool_to(L, 1);
  mp_pool_drop_inherited(pc, (int)(mp_pool_slot(L, pc, 2) - pc->s));
  return 0;
}

/* core.pool_dumpfn(fn) -> bytes of fn for pc:def [, fds: copies of the
   fds of the handles it holds (its upvalues'), owned until collected] */
static int pool_dumpfn(lua_State *L) {
  mp_buf *b;
  mp_fdlist *fds, *dups;
  int err;
  luaL_checkany(L, 1);
  lua_settop(L, 1);
  b = mp_buf_push(L, 256);               /* 2 */
  fds = (mp_fdlist *)lua_newuserdatauv(L, sizeof(mp_fdlist), 0);   /* 3 */
  fds->n = 0;
  mp_encode_named(L, 1, b, fds, "fn");
  lua_pushlstring(L, b->data, b->len);
  if (fds->n == 0) return 1;
  dups = (mp_fdlist *)lua_newuserdatauv(L, sizeof(mp_fdlist), 0);
  dups->n = 0;
  luaL_setmetatable(L, MP_POOLFDS_T);
  if ((err = mp_fdlist_dup(fds, dups)) != 0) return mp_raise_errno(L, err, "pool: dup");
  return 2;
}

/* core.pool_dumps(v, name) -> bytes of v for a pool whose transport
   cannot carry fds (the cluster's, over Redis): a handle raises
   SerializationError naming where it sits (name: the root of the path) */
static int pool_dumps(lua_State *L) {
  mp_buf *b;
  const char *root = luaL_optstring(L, 2, NULL);
  luaL_checkany(L, 1);
  lua_settop(L, 2);
  b = mp_buf_push(L, 256);
  mp_encode_named(L, 1, b, NULL, root);
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
  pcore_release(mp_pool_to(L, 1));
  return 0;
}

static const luaL_Reg pool_methods[] = {
  {"open", pool_open},
  {"forked", pool_forked},
  {"close_slot", pool_close_slot},
  {"def", pool_def},
  {"ctl", pool_ctl},
  {"tasks", pool_tasks},
  {"framed", pool_framed},
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
  {NULL, NULL}
};

MP_API void mp_pool_open(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"pool_new", pool_new},
    {"pool_dumpfn", pool_dumpfn},
    {"pool_dumps", pool_dumps},
    {"pool_table", pool_table},
    {NULL, NULL}
  };
  static const luaL_Reg pool_meta[] = {
    {"__gc", pool__gc}, {"__close", pool__gc}, {NULL, NULL}
  };
  static const luaL_Reg poolfds_meta[] = {
    {"__gc", poolfds__gc}, {"__close", poolfds__gc}, {NULL, NULL}
  };
  mp_newclass(L, MP_POOL_T, (const luaL_Reg *const[]){ pool_methods, NULL },
              pool_meta, NULL, NULL);
  lua_pop(L, 1);
  mp_newclass(L, MP_POOLFDS_T, NULL, poolfds_meta, NULL, NULL);
  lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
}
