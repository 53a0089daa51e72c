/*
 * queue_feeder.c: a producer's feeder (queue.h): the items an unbounded put
 * left behind, and the helper thread that writes them into the ring
 * (docs/design.md, decision 7: it moves raw bytes only and never touches
 * a lua_State).
 *
 * An unbounded put never waits. When more than SOFT_BYTES are queued, the
 * item is not copied into fresh ring memory: it waits in this process's
 * feeder (a reference to the Lua string or encoded buffer, kept alive in
 * the queue's user value), and a helper thread moves it into the ring as
 * consumers make room, as Python's feeder thread does. Whatever is still in
 * the feeder when the queue is closed or the process exits (exit hooks,
 * atexit) is written as consumers make room, and at once (growing the
 * ring) when none took an item for DRAIN_IDLE; __gc writes it at once.
 * cancel_join_thread drops it instead.
 *
 * The thread blocks every signal, so that signals reach the thread whose
 * wait must see them. A feeder belongs to the process that made it: one
 * inherited through fork is forgotten, never touched.
 */
#include "queue.h"

#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define INLINE_MAX  256   /* items this small are copied into the node */
#define DRAIN_IDLE  0.01  /* FEED_DRAIN: seconds without a get before the
                             rest is written at once */
#define FEED_BATCH  64    /* items the thread writes under one lock */
#define CHAN_IDLE   1.0   /* FEED_DRAIN: seconds without a get before items
                             the full descriptor channel cannot take are
                             dropped */

typedef struct pnode {
  struct pnode *next;
  const char *p;          /* the payload after head: in a kept Lua value,
                             or inl */
  uint64_t len;
  char head[MP_CODEC_SCALAR_MAX];  /* the payload's first bytes: a scalar's
                                      message or a string's head */
  size_t hlen;
  int ref;                /* slot in the keep table, or LUA_NOREF */
  int done;               /* in the ring (set by the thread) */
  int nfds;               /* an item with fds: its dups, until sent */
  int *fds;
  char inl[1];            /* small payloads are copied here */
} pnode;

typedef struct feeder {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  pthread_t th;
  int started, stop, cancel;
  int pid;                /* the process that owns it */
  int error;              /* errno of a write that failed (ring growth) */
  int chan_error;         /* errno of a datagram that could not be sent
                             (its item was dropped), until put reports it */
  mp_queue *q;
  pnode *head, *tail;     /* every node not yet released by the Lua side */
  pnode *next;            /* first node not yet in the ring */
  struct feeder *link;    /* all feeders of this process (atexit) */
} feeder;

static feeder *all_feeders;

/* Close a node's fds (sent or dropped). */
static void node_close_fds(pnode *n) {
  int i;
  for (i = 0; i < n->nfds; i++) close(n->fds[i]);
  free(n->fds);
  n->fds = NULL;
  n->nfds = 0;
}

static void node_free(pnode *n) {
  node_close_fds(n);
  free(n);
}

/* A JoinableQueue's items are counted at put: one dropped unwritten (its
   descriptors could not be sent, or the process exits with the channel
   full) is taken back from the count, under the lock, so that join()
   does not wait for an item no consumer will ever get. */
static void uncount(mp_queue *q, qstate *st, uint32_t n) {
  if (q->kind != K_JOINABLE) return;
  st->unfinished = st->unfinished > n ? st->unfinished - n : 0;
}

/* Write v[0], then as many of v[1..cnt) as fit, into the ring (mode: see
   FEED_*); *written says how many. An item whose descriptors could not be
   sent is dropped and counted in *written, its errno in *chan_err (the
   next put raises it). Returns 0, -1 when the thread is asked to stop, or
   an errno. */
static int feed_some(mp_queue *q, feeder *f, pnode **v, int cnt, int mode,
                     int *written, int *chan_err) {
  qshm *s = q->shm;
  pnode *n = v[0];
  uint64_t seen = mp_atomic_load(&s->ngets);
  double idle_since = mp_now();
  for (;;) {
    qstate st;
    int err, wake = 0, i, slot, chan_full = 0;
    uint32_t seq;
    mpq_lock(s);
    st = s->st;
    if (st.nitems == 0) st.head = st.tail = st.wrap = 0;
    if (mode != FEED_GROW && st.nitems > 0 &&
        mpq_used(&st) + mpq_rec_size(n->hlen + n->len) > SOFT_BYTES) {
      if (mode == FEED_DRAIN) {
        uint64_t g = s->ngets;
        double now = mp_now();
        if (g != seen) { seen = g; idle_since = now; }
        if (now - idle_since >= DRAIN_IDLE) goto write;  /* nobody takes */
      }
      slot = mpq_sleeper_add(s, W_FEED);
      seq = mp_atomic_load(&s->not_full);
      mpq_unlock(s);
      mpq_sleep(&s->not_full, seq, slot,
                mp_now() + (mode == FEED_DRAIN ? DRAIN_IDLE / 4 : 0.02));
      mpq_sleeper_del(s, W_FEED, slot);
      if (mode == FEED_WAIT && mp_atomic_load_acquire(&f->stop))
        return -1;
      continue;
    }
  write:
    err = 0;
    for (i = 0; i < cnt; i++) {           /* as many as fit, in one go */
      int w = 0;
      n = v[i];
      if (i > 0 && mode != FEED_GROW &&
          mpq_used(&st) + mpq_rec_size(n->hlen + n->len) > SOFT_BYTES)
        break;
      if (n->nfds > 0) {                  /* its fds first, then its record */
        int e = mpq_chan_send(q, n->fds, n->nfds, n->head, st.nitems == 0);
        if (e == EAGAIN) { chan_full = 1; break; }
        node_close_fds(n);                /* the datagram holds its own */
        if (e != 0) {                     /* dropped; the next put says so */
          *chan_err = e;
          uncount(q, &st, 1);             /* never to be taken: join must not wait */
          continue;
        }
      }
      if ((err = mpq_write(q, &st, n->head, n->hlen, n->p, n->len, 0, &w)) != 0)
        break;
      wake |= w;
    }
    *written = i;
    if (*chan_err != 0) mpq_commit(s, &st);   /* the counts uncount took back */
    mpq_unlock(s);
    if (wake) mpq_wake(s, &s->not_empty, 1);
    if (*chan_err != 0 && st.unfinished == 0) mp_futex_wake(&s->st.unfinished, 0x7fffffff);
    if (chan_full && i == 0) {            /* wait for room in the channel */
      if (mode == FEED_GROW) return -1;   /* never waits: the rest is dropped */
      if (mode == FEED_DRAIN) {
        uint64_t g = mp_atomic_load(&s->ngets);
        double now = mp_now();
        if (g != seen) { seen = g; idle_since = now; }
        if (now - idle_since >= CHAN_IDLE) return -1;
      }
      mpq_chan_wait(q, -1, 0.02);
      if (mode == FEED_WAIT && mp_atomic_load_acquire(&f->stop)) return -1;
      continue;
    }
    return err;
  }
}

static void *feeder_main(void *arg) {
  feeder *f = (feeder *)arg;
  pthread_mutex_lock(&f->mu);
  for (;;) {
    pnode *v[FEED_BATCH], *n;
    int r, k = 0, written = 0, i, cerr = 0;
    while (!f->stop && f->next == NULL) pthread_cond_wait(&f->cv, &f->mu);
    if (f->stop) break;
    for (n = f->next; n != NULL && k < FEED_BATCH; n = n->next) v[k++] = n;
    pthread_mutex_unlock(&f->mu);
    r = feed_some(f->q, f, v, k, FEED_WAIT, &written, &cerr);
    pthread_mutex_lock(&f->mu);
    if (cerr != 0) f->chan_error = cerr;  /* (read under the mutex) */
    for (i = 0; i < written; i++) v[i]->done = 1;
    if (written > 0) f->next = v[written - 1]->next;
    if (r > 0) {
      f->error = r;                       /* put reports it; stop feeding */
      break;
    }
  }
  pthread_mutex_unlock(&f->mu);
  return NULL;
}

/* This process's feeder of q, or NULL (one inherited from the parent by
   fork belongs to the parent: forget it, never touch its mutex). */
static feeder *feeder_of(mp_queue *q) {
  feeder *f = q->feeder;
  if (f != NULL && f->pid != mp_getpid()) {
    q->feeder = NULL;
    return NULL;
  }
  return f;
}

/* Stop the thread and write what is left (unless cancelled or !flush),
   then free everything. Never raises; used by close, __gc and exits. */
MP_API void mpq_feeder_finish(mp_queue *q, int mode) {
  feeder *f = feeder_of(q), **pp;
  pnode *n, *nx;
  if (f == NULL) { q->feeder = NULL; return; }
  if (f->started) {
    pthread_mutex_lock(&f->mu);
    mp_atomic_store(&f->stop, 1);
    pthread_cond_signal(&f->cv);
    pthread_mutex_unlock(&f->mu);
    pthread_join(f->th, NULL);
  }
  if (mode != FEED_NONE && !f->cancel && f->error == 0)
    for (; f->next != NULL; f->next = f->next->next) {
      int written, cerr = 0;
      n = f->next;
      if (feed_some(q, f, &n, 1, mode, &written, &cerr) != 0) break;
    }
  if (f->next != NULL && q->shm != NULL && q->kind == K_JOINABLE) {
    int64_t lost = 0;                     /* never written: see uncount */
    for (n = f->next; n != NULL; n = n->next) lost++;
    mpq_unfinished_add(q, -lost);
  }
  for (n = f->head; n != NULL; n = nx) {
    nx = n->next;
    node_free(n);
  }
  for (pp = &all_feeders; *pp != NULL; pp = &(*pp)->link)
    if (*pp == f) { *pp = f->link; break; }
  pthread_cond_destroy(&f->cv);
  pthread_mutex_destroy(&f->mu);
  free(f);
  q->feeder = NULL;
}

/* atexit: flush the feeders of this process (os.exit skips __gc). */
static void feeders_atexit(void) {
  feeder *f = all_feeders, *nx;
  for (; f != NULL; f = nx) {
    nx = f->link;
    if (f->pid == mp_getpid()) mpq_feeder_finish(f->q, FEED_DRAIN);
  }
}

/* core.queue_flush_all(): flush every feeder of this process now (the
   exit hook of a child process) */
static int queue_flush_all(lua_State *L) {
  (void)L;
  feeders_atexit();
  return 0;
}

/* core.queue_set_exit_hook(fn): fn() is called once per process when its
   first feeder starts (queues.lua registers the flush as an exit hook) */
static int queue_set_exit_hook(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, "multiprocessing.queue_exit_hook");
  return 0;
}

/* Release the nodes the thread has written: drop their kept values. */
static void feeder_release(lua_State *L, mp_queue *q, feeder *f, int qi) {
  pnode *done = NULL, *n;
  pthread_mutex_lock(&f->mu);
  if (f->head != NULL && f->head->done) {
    done = f->head;
    for (n = done; n->next != NULL && n->next->done; n = n->next) {}
    f->head = n->next;
    if (f->head == NULL) f->tail = NULL;
    n->next = NULL;
  }
  pthread_mutex_unlock(&f->mu);
  if (done == NULL) return;
  lua_getiuservalue(L, qi, 1);            /* keep */
  for (n = done; n != NULL; n = done) {
    done = n->next;
    if (n->ref != LUA_NOREF && lua_istable(L, -1)) luaL_unref(L, -1, n->ref);
    node_free(n);
  }
  lua_pop(L, 1);
  (void)q;
}

/* Drop the kept values of items the feeder has written (any call on the
   queue does this, so that delivered items are not kept alive). */
MP_API void mpq_feeder_tidy(lua_State *L, mp_queue *q) {
  feeder *f = q->feeder;
  if (f != NULL && f->pid == mp_getpid()) feeder_release(L, q, f, 1);
}

static int registered_atexit;
static int hook_pid;

MP_API struct feeder *mpq_feeder_start(lua_State *L, mp_queue *q) {
  feeder *f = feeder_of(q);
  sigset_t all, old;
  if (f != NULL) return f;
  f = (feeder *)calloc(1, sizeof(feeder));
  if (f == NULL) luaL_error(L, "Queue.put: not enough memory");
  pthread_mutex_init(&f->mu, NULL);
  pthread_cond_init(&f->cv, NULL);
  f->pid = mp_getpid();
  f->q = q;
  q->feeder = f;
  f->link = all_feeders;
  all_feeders = f;
  if (!registered_atexit) registered_atexit = atexit(feeders_atexit) == 0;
  lua_newtable(L);                        /* a fresh keep table */
  lua_setiuservalue(L, 1, 1);
  sigfillset(&all);    /* signals go to the Lua thread, whose waits see them */
  pthread_sigmask(SIG_BLOCK, &all, &old);
  f->started = pthread_create(&f->th, NULL, feeder_main, f) == 0;
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (!f->started) {
    mpq_feeder_finish(q, FEED_NONE);
    luaL_error(L, "Queue.put: cannot start the feeder thread");
  }
  if (hook_pid != mp_getpid()) {          /* flush at this process's exit */
    hook_pid = mp_getpid();
    if (lua_getfield(L, LUA_REGISTRYINDEX, "multiprocessing.queue_exit_hook")
        == LUA_TFUNCTION)
      lua_call(L, 0, 0);
    else
      lua_pop(L, 1);
  }
  return f;
}

MP_API void mpq_feeder_put(lua_State *L, struct feeder *f, const char *h,
                           size_t hlen, const char *p, uint64_t len, int vi,
                           mp_fdlist *fds) {
  int small = len <= INLINE_MAX, nfds = fds != NULL ? fds->n : 0;
  pnode *n = (pnode *)malloc(sizeof(pnode) + (small ? (size_t)len : 0));
  int *fv = nfds > 0 ? (int *)malloc(sizeof(int) * (size_t)nfds) : NULL;
  if (n == NULL || (nfds > 0 && fv == NULL)) {
    free(n);
    free(fv);
    if (fds != NULL) mp_fdlist_close(fds);
    luaL_error(L, "Queue.put: not enough memory");
    return;                               /* not reached */
  }
  n->next = NULL;
  n->len = len;
  if (hlen) memcpy(n->head, h, hlen);
  n->hlen = hlen;
  n->done = 0;
  n->ref = LUA_NOREF;
  n->nfds = nfds;
  n->fds = fv;
  if (nfds > 0) {                         /* the node owns them from here */
    memcpy(fv, fds->fd, sizeof(int) * (size_t)nfds);
    fds->n = 0;
    n->hlen = MARK_LEN;                   /* its marker, written when sent */
  }
  if (small) {
    if (len) memcpy(n->inl, p, (size_t)len);
    n->p = n->inl;
  } else {
    n->p = p;
    lua_getiuservalue(L, 1, 1);           /* keep */
    lua_pushvalue(L, vi);
    n->ref = luaL_ref(L, -2);             /* may raise: n is not linked yet */
    lua_pop(L, 1);
  }
  pthread_mutex_lock(&f->mu);
  if (f->tail) f->tail->next = n; else f->head = n;
  f->tail = n;
  if (f->next == NULL) f->next = n;
  pthread_cond_signal(&f->cv);
  pthread_mutex_unlock(&f->mu);
}

MP_API int mpq_feeder_pending(lua_State *L, mp_queue *q, int *err) {
  feeder *f = feeder_of(q);
  int behind;
  *err = 0;
  if (f == NULL) return 0;
  feeder_release(L, q, f, 1);
  pthread_mutex_lock(&f->mu);
  behind = f->next != NULL;
  *err = f->error;
  if (*err == 0 && f->chan_error != 0) {  /* reported once */
    *err = -f->chan_error;
    f->chan_error = 0;
  }
  pthread_mutex_unlock(&f->mu);
  return behind;
}

MP_API void mpq_feeder_cancel(mp_queue *q) {
  feeder *f = q->shm != NULL ? feeder_of(q) : NULL;
  if (f != NULL) f->cancel = 1;
}

const luaL_Reg mpq_feeder_funcs[] = {
  {"queue_flush_all", queue_flush_all},
  {"queue_set_exit_hook", queue_set_exit_hook},
  {NULL, NULL}
};
