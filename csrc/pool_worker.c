/*
 * pool_worker.c: the pool's worker side (docs/design.md, decisions 6 and
 * 10): the loop a worker runs on its channel, and the PoolWorker handle
 * that carries a channel to a worker that is not forked. The frames are
 * pool.h's; the parent's side is pool.c.
 *
 * The loop (serve) reads frames in large pieces, keeps the functions DEF
 * frames send by id, and runs each TASK's chunk under one lua_pcall (the
 * runner below); when an item raises, the runner is called again from the
 * next item. A chunk's RESULT is sent as soon as the chunk is done, except
 * that the results of quick chunks (under QUICK_US each) ride together
 * while more work is already waiting, for at most BATCH_AGE or BATCH_MAX
 * bytes: one write for many, which is what makes chunksize 1 cheap. The
 * worker records the chunk it started last and the one it finished last
 * in its slot of the shared page, so that the parent knows what it died
 * in. It leaves on EXIT, at the end of the channel, after maxtasks tasks,
 * or (sending RETIRE first) with a heap above maxmem after a chunk.
 * Workers ignore SIGINT (Ctrl-C is the parent's business; the parent's
 * terminate or __gc stops them).
 *
 * A forked worker serves its slot of the inherited PoolCore (pc:worker);
 * one with no initializer first waits in C for its first frame, before it
 * enters Lua at all, and leaves from there if that frame is EXIT
 * (lazy_wait). A spawned or forkserver worker has no PoolCore: it
 * receives a PoolWorker handle (MP_POOLWORKER_T; its channel end and the
 * shared page's memfd, by SCM_RIGHTS) and serves that (w:serve); both run
 * the same loop.
 */
#include "pool.h"

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define QUICK_US 100                 /* a chunk this quick may wait to be sent */
#define BATCH_MAX 65536              /* bytes of results held back at most */
#define BATCH_AGE 0.001              /* seconds a result is held back at most */

/* Send the whole of b on fd, the fds of q (NULL: none) with their frames,
   and empty both: 0, or an errno. */
static int send_buf(int fd, mp_buf *b, pool_fdq *q) {
  struct iovec iov;
  size_t pos = 0;
  int e;
  if (b->len == 0) return 0;
  if (q != NULL) e = mp_pool_send(fd, b, &pos, b->len, q, 0);
  else {
    iov.iov_base = b->data;
    iov.iov_len = b->len;
    e = mp_sendall(fd, &iov, 1, NULL);
  }
  if (q != NULL) mp_pool_fdq_drop_before(q, SIZE_MAX);   /* none, unless it failed */
  b->len = 0;
  return e;
}

/* Send an INITFAIL frame with the error at idx on fd. */
static void send_initfail(lua_State *L, int fd, int idx) {
  mp_buf *b;
  size_t at;
  idx = lua_absindex(L, idx);
  b = mp_buf_push(L, 256);
  at = pool_frame_open(L, b);
  pool_put_value(L, b, idx, -1, NULL, 0);
  pool_frame_close(b, at, MP_FRAME_INITFAIL, 0);
  if (fd >= 0) send_buf(fd, b, NULL);
  lua_pop(L, 1);
}

/* ---- running a chunk ------------------------------------------------ */

typedef struct wctx {
  const char *p, *end;               /* unread items of the chunk */
  uint32_t k, n;                     /* next item, items */
  mp_buf *out;
  size_t item_start;                 /* where the running item's result starts */
  const pool_fifo *ff;               /* the chunk's fds */
  pool_fdq *q;                       /* the results' fds */
  size_t fstart;                     /* where the RESULT frame starts in out */
} wctx;

/* Push the arguments of an item sent as one value, {args..., n = argc}
   (out of the runner's way: its plain path stays small); returns argc. */
static __attribute__((noinline)) uint32_t unpack_args(lua_State *L, wctx *c) {
  lua_Integer n, j;
  int t = lua_gettop(L) + 1;
  c->p = pool_get_value(L, c->p, c->end, c->ff);
  if (lua_type(L, t) != LUA_TTABLE || lua_getfield(L, t, "n") != LUA_TNUMBER)
    return (uint32_t)mp_pool_corrupt(L);
  n = lua_tointeger(L, -1);
  if (n < 0 || n > 250) return (uint32_t)mp_pool_corrupt(L);
  lua_pop(L, 1);
  luaL_checkstack(L, (int)n + 8, "too many arguments");
  for (j = 1; j <= n; j++) lua_rawgeti(L, t, j);
  lua_remove(L, t);
  return (uint32_t)n;
}

/* The runner: items ctx->k .. n-1 of a chunk, called under lua_pcall with
   (fn, ctx); an item that raises ends this call, the loop resumes after it. */
static int pool_runner(lua_State *L) {
  wctx *c = (wctx *)lua_touserdata(L, 2);
  while (c->k < c->n) {
    uint32_t argc, j;
    int nres, i;
    char *w;
    if (c->end - c->p < 4) return mp_pool_corrupt(L);
    argc = pool_rd_u32(c->p);
    c->p += 4;
    if (argc > 250 && argc != POOL_ARGS_ONE) return mp_pool_corrupt(L);
    c->item_start = c->out->len;
    c->k++;
    lua_settop(L, 2);
    lua_pushvalue(L, 1);
    if (argc == POOL_ARGS_ONE) {
      argc = unpack_args(L, c);
    } else {
      if (argc > 8)                     /* a C function has 20 slots free */
        luaL_checkstack(L, (int)argc + 8, "too many arguments");
      for (j = 0; j < argc; j++) c->p = pool_get_value(L, c->p, c->end, c->ff);
    }
    lua_call(L, (int)argc, LUA_MULTRET);
    nres = lua_gettop(L) - 2;
    if (nres > 255) luaL_error(L, "a task may return at most 255 values");
    w = c->out->cap - c->out->len >= 5 ? c->out->data + c->out->len   /* no call */
                                        : mp_buf_reserve(L, c->out, 5);
    w[0] = 0;                                    /* ok */
    pool_wr_u32(w + 1, (uint32_t)nres);
    c->out->len += 5;
    for (i = 3; i <= nres + 2; i++) pool_put_value(L, c->out, i, -1, c->q, c->fstart);
  }
  return 0;
}

/* The loop's state. Its Lua values sit in stack slots above the message
   handler: msgh, in, out, fns, then fn while a chunk runs. */
typedef struct wloop {
  int fd;                            /* the channel */
  shslot *sh;                        /* this worker's record in the page */
  lua_Integer maxtasks, done;        /* tasks to run (0: no limit), run */
  double maxmem;                     /* heap bytes to retire above (0: none) */
  int msgh, fns, fn;                 /* stack slots: handler, fnid -> function,
                                        the running chunk's function */
  mp_buf *in, *out;                  /* boxed in slots msgh+1, msgh+2 */
  size_t pos;                        /* unread: in->data[pos .. len) */
  pool_fifo ff;                      /* fds read; the frame's claimed */
  pool_fdq q;                        /* fds of the results in out */
  double held_since;                 /* when out's first result was made */
} wloop;

/* Run the chunk of a TASK payload p[0 .. len) (len >= 12) and append its
   RESULT frame to out: returns the chunk's time in microseconds. */
static double run_chunk(lua_State *L, wloop *w, const char *p, size_t len) {
  wctx c;
  double t0 = mp_now(), us;
  uint32_t seq = pool_rd_u32(p);
  size_t fstart;
  char *h;
  __atomic_store_n(&w->sh->started, seq, __ATOMIC_RELEASE);
  c.p = p + 12;
  c.end = p + len;
  c.k = 0;
  c.n = pool_rd_u32(p + 8);
  c.out = w->out;
  c.ff = &w->ff;
  c.q = &w->q;
  fstart = c.fstart = pool_frame_open(L, w->out);
  h = mp_buf_reserve(L, w->out, 12);
  pool_wr_u32(h, seq);
  pool_wr_u32(h + 4, c.n);
  pool_wr_u32(h + 8, 0);                         /* microseconds, below */
  w->out->len += 12;
  c.item_start = w->out->len;
  lua_rawgeti(L, w->fns, pool_rd_u32(p + 4));    /* w->fn */
  if (lua_type(L, w->fn) != LUA_TFUNCTION) luaL_error(L, "pool: unknown function");
  while (c.k < c.n) {
    lua_pushcfunction(L, pool_runner);
    lua_pushvalue(L, w->fn);
    lua_pushlightuserdata(L, &c);
    if (lua_pcall(L, 2, 0, w->msgh) != LUA_OK) {   /* item c.k-1 raised */
      w->out->len = c.item_start;
      *mp_buf_reserve(L, w->out, 1) = 1;           /* failed */
      w->out->len++;
      pool_put_value(L, w->out, -1, -1, NULL, 0);
      lua_pop(L, 1);
      if (c.k == 0) break;                         /* corrupt: give up */
    }
  }
  lua_settop(L, w->fns);
  w->done += c.n;
  us = (mp_now() - t0) * 1e6;
  pool_wr_u32(w->out->data + fstart + MP_FRAME_HDR + 8,
              us > 4e9 ? 4000000000u : (uint32_t)us);
  pool_frame_close(w->out, fstart, MP_FRAME_RESULT, pool_fdq_count(&w->q, fstart));
  __atomic_store_n(&w->sh->finished, seq, __ATOMIC_RELEASE);
  if (fstart == 0) w->held_since = t0;
  return us;
}

/* ---- the loop ------------------------------------------------------- */

/* Does in hold a whole frame at pos? Its header goes to *f once in holds
   one. */
static int frame_ready(const mp_buf *in, size_t pos, mp_frame *f) {
  size_t have = in->len - pos;
  if (have < MP_FRAME_HDR) return 0;
  mp_frame_get(in->data + pos, f);
  return have - MP_FRAME_HDR >= f->len;
}

/* Read until in holds a whole frame at w->pos (its header in *f); 0 at
   the end of the stream or on an error. */
static int read_frame(lua_State *L, wloop *w, mp_frame *f) {
  mp_buf *in = w->in;
  for (;;) {
    size_t have = in->len - w->pos;
    ssize_t r;
    if (frame_ready(in, w->pos, f)) return 1;
    if (w->pos > 0) {
      memmove(in->data, in->data + w->pos, have);
      in->len = have;
      w->pos = 0;
    }
    if (have >= MP_FRAME_HDR) {                  /* room for all of it */
      if (f->len > (uint64_t)SIZE_MAX / 4) mp_pool_corrupt(L);
      mp_buf_reserve(L, in, (size_t)f->len + MP_FRAME_HDR - have);
    }
    if (in->cap - in->len < 4096) mp_buf_reserve(L, in, RBUF_INIT);
    r = mp_pool_recv(L, w->fd, in->data + in->len, in->cap - in->len, 0, &w->ff);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return 0;
    in->len += (size_t)r;
  }
}

static double heap_bytes(lua_State *L) {
  return lua_gc(L, LUA_GCCOUNT, 0) * 1024.0 + lua_gc(L, LUA_GCCOUNTB, 0);
}

/* Is the heap above maxmem (> 0) even after a full collection? */
static int over_memory(lua_State *L, double maxmem) {
  if (maxmem <= 0 || heap_bytes(L) <= maxmem) return 0;
  lua_gc(L, LUA_GCCOLLECT, 0);
  return heap_bytes(L) > maxmem;
}

/* The worker's loop: serve the channel fd until EXIT, its end, maxtasks
   tasks or a heap above maxmem bytes after a chunk, recording progress in
   sh. The message handler is at the top of the stack; on return the stack
   is as it was. Closes nothing but the fds that came. */
static void serve(lua_State *L, int fd, shslot *sh, lua_Integer maxtasks,
                  double maxmem) {
  wloop w;
  mp_frame f;
  memset(&w, 0, sizeof w);
  w.fd = fd;
  w.sh = sh;
  w.maxtasks = maxtasks;
  w.maxmem = maxmem;
  signal(SIGINT, SIG_IGN);               /* Ctrl-C is the parent's business */
  w.msgh = lua_gettop(L);
  w.in = mp_buf_push(L, RBUF_INIT);
  w.out = mp_buf_push(L, RBUF_INIT);
  lua_newtable(L);
  w.fns = lua_gettop(L);
  w.fn = w.fns + 1;
  __atomic_store_n(&sh->ready, 1, __ATOMIC_RELEASE);
  for (;;) {
    const char *p;
    size_t len;
    pool_unclaim(&w.ff);                 /* the last frame's fds */
    if (w.pos == w.in->len && pool_fifo_unclaimed(&w.ff)) mp_pool_corrupt(L);
    /* about to wait: send what is held back */
    if (!frame_ready(w.in, w.pos, &f) && send_buf(fd, w.out, &w.q) != 0) break;
    if (!read_frame(L, &w, &f)) break;
    p = w.in->data + w.pos + MP_FRAME_HDR;
    len = (size_t)f.len;
    w.pos += MP_FRAME_HDR + len;
    pool_claim(L, &w.ff, f.nfds);
    if (f.kind == MP_FRAME_EXIT) break;
    if (f.kind == MP_FRAME_CLEAR) {
      lua_newtable(L);
      lua_replace(L, w.fns);
    } else if (f.kind == MP_FRAME_DEF && len >= 4) {
      mp_fdlist fds;                     /* the function's handles own them */
      int i;
      fds.n = w.ff.claimed;
      for (i = 0; i < fds.n; i++)
        fds.fd[i] = ((const int *)(const void *)w.ff.f.data)[w.ff.head + (size_t)i];
      w.ff.head += (size_t)fds.n;
      w.ff.claimed = 0;
      mp_decode(L, p + 4, len - 4, &fds, 0);
      lua_rawseti(L, w.fns, pool_rd_u32(p));
    } else if (f.kind == MP_FRAME_TASK && len >= 12) {
      double us = run_chunk(L, &w, p, len);
      int last = w.maxtasks > 0 && w.done >= w.maxtasks;
      /* a quick chunk with the next one already here: its result rides
         with the next ones (one write for many) */
      if (!last && us < QUICK_US && w.out->len < BATCH_MAX &&
          frame_ready(w.in, w.pos, &f) && mp_now() - w.held_since < BATCH_AGE)
        continue;
      if (send_buf(fd, w.out, &w.q) != 0 || last) break;
      if (over_memory(L, w.maxmem)) {
        pool_frame_close(w.out, pool_frame_open(L, w.out), MP_FRAME_RETIRE, 0);
        send_buf(fd, w.out, &w.q);
        break;
      }
    } else {
      mp_pool_corrupt(L);
    }
  }
  send_buf(fd, w.out, &w.q);
  mp_pool_fifo_free(&w.ff);
  mp_pool_fdq_free(&w.q);
  lua_settop(L, w.msgh);
}

/* ---- the forked worker's methods of its inherited PoolCore ---------- */

/* pc:initfail(i, err): in the worker, report that the initializer raised */
static int pool_initfail(lua_State *L) {
  pcore *pc = mp_pool_to(L, 1);
  slot *s = mp_pool_slot(L, pc, 2);
  lua_settop(L, 3);                      /* pc, i, err */
  send_initfail(L, s->wfd, 3);
  return 0;
}

/* pc:worker(i, maxtasks, maxmem, msgh) -> exit code: in the forked worker,
   serve slot i's channel (see serve) */
static int pool_worker(lua_State *L) {
  pcore *pc = mp_pool_to(L, 1);
  slot *s = mp_pool_slot(L, pc, 2);
  lua_Integer maxtasks = luaL_optinteger(L, 3, 0);
  double maxmem = luaL_optnumber(L, 4, 0);
  int me = (int)(s - pc->s);
  luaL_checktype(L, 5, LUA_TFUNCTION);
  lua_settop(L, 5);                      /* msgh on top */
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
  char h[MP_FRAME_HDR];
  mp_frame f;
  ssize_t r;
  signal(SIGINT, SIG_IGN);               /* as serve: the parent's business */
  mp_pool_drop_inherited(pc, me);
  __atomic_store_n(&pc->shm[me].ready, 1, __ATOMIC_RELEASE);
  /* (a peek returns what has come: a header that came in two pieces,
     which the parent's whole-frame writes do not make, would take the
     ordinary path) */
  do r = recv(s->wfd, h, sizeof h, MSG_PEEK);
  while (r < 0 && errno == EINTR);
  if (r == 0) _exit(0);
  if (r == (ssize_t)sizeof h) {
    mp_frame_get(h, &f);
    if (f.kind == MP_FRAME_EXIT && f.len == 0) _exit(0);
  }
}

/* pc:lazy(i, p): slot i's worker, the forked Process p not started yet,
   waits for its first frame before it enters Lua (lazy_wait) */
static int pool_lazy(lua_State *L) {
  pcore *pc = mp_pool_check(L, 1);
  slot *s = mp_pool_slot(L, pc, 2);
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
  pcore *pc = mp_pool_check(L, 1);
  slot *s = mp_pool_slot(L, pc, 2);
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
  pc = mp_pool_to(L, lua_gettop(L));
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
  lua_settop(L, 4);                      /* msgh on top */
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

MP_API void mp_pool_worker_open(lua_State *L) {
  static const luaL_Reg pool_methods[] = {
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
  static const luaL_Reg pworker_meta[] = {
    {"__gc", pworker__gc}, {"__close", pworker__gc}, {"__tostring", pworker__tostring},
    {"__mp_reduce", pworker__reduce}, {NULL, NULL}
  };
  static const luaL_Reg funcs[] = {
    {"_pool_runner", pool_runner},
    {NULL, NULL}
  };
  mp_newclass(L, MP_POOLWORKER_T, (const luaL_Reg *const[]){ pworker_methods, NULL },
              pworker_meta, NULL, NULL);
  lua_pop(L, 1);
  /* PoolCore's methods for the worker's side (pool.c registered the class) */
  luaL_getmetatable(L, MP_POOL_T);       /* mod, mt */
  lua_getfield(L, -1, "__index");        /* mod, mt, methods */
  luaL_setfuncs(L, pool_methods, 0);
  lua_pop(L, 2);
  luaL_setfuncs(L, funcs, 0);
  lua_pushcfunction(L, pworker_rebuild);
  mp_register_handle(L, "PoolWorker");
}
