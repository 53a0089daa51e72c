/*
 * mp.h: declarations shared by the C files of multiprocessing.core.
 *
 * Each file owns one concern and registers its classes in its *_open(L),
 * which core.c calls in order. Class names are macros so that luaL_newmetatable
 * gives __name, and messages name the class for free. Everything here is
 * hidden (-fvisibility=hidden) except what multiprocessing.h exports.
 *
 * Interfaces between files:
 *   - errors: mp_raise() builds an error object through the Lua module
 *     multiprocessing.errors and raises it.
 *   - codec: mp_encode()/mp_decode() turn a Lua value into a message and
 *     back; a message may carry file descriptors (handles), collected in an
 *     mp_fdlist that the transport sends beside the bytes (SCM_RIGHTS) or,
 *     under fork, that the receiver already has (codec_enc.c, codec_dec.c;
 *     codec.c is mp.dumps and mp.loads). codec_scalar.c is its fast path
 *     for one scalar (the same bytes, without the general encoder's
 *     set-up); codec.h is the one definition of the format's tags,
 *     codec_scalar.h of a scalar's bytes.
 *   - frames: every stream (a Connection, a pool channel) carries wire.c's
 *     frames, sent by its one send loop, mp_sendv().
 *   - handles: a userdata whose metatable has __mp_reduce travels as a
 *     handle (see codec_enc.c, codec_dec.c); each kind is rebuilt by the function its C
 *     file's opener registered with mp_register_handle (a kind made in
 *     Lua, a manager's proxy, with core.register_handle).
 *   - time: mp_deadline()/mp_remaining_ms() on CLOCK_MONOTONIC.
 *   - pid identity: mp_getpid(), mp_start_tag(), mp_process_gone(): who
 *     holds a lock word, and whether that process is gone.
 *   - shared memory: mp_shm_create()/mp_shm_map() and futexes (shm.c).
 */
#ifndef MP_H
#define MP_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include "lua.h"
#include "lauxlib.h"

#define MP_API __attribute__((visibility("hidden")))

/* class names (luaL_newmetatable) */
#define MP_PROCESS_T    "multiprocessing.Process"
#define MP_CONNECTION_T "multiprocessing.Connection"
#define MP_LISTENER_T   "multiprocessing.Listener"
#define MP_BUF_T        "multiprocessing.Buffer"
/* queue.c: one struct, three classes (method sets) */
#define MP_QUEUE_T          "multiprocessing.Queue"
#define MP_SIMPLEQUEUE_T    "multiprocessing.SimpleQueue"
#define MP_JOINABLEQUEUE_T  "multiprocessing.JoinableQueue"

/* Most fds one message may carry (SCM_RIGHTS allows 253). */
#define MP_MAX_FDS 64

typedef struct mp_fdlist {
  int n;
  int fd[MP_MAX_FDS];
} mp_fdlist;

/* A growable byte buffer owned by a userdata (MP_BUF_T), so that a raise
   while it is filled leaks nothing. */
typedef struct mp_buf {
  char *data;
  size_t len, cap;
} mp_buf;

/* -- ground.c ------------------------------------------------------- */
/* Raise an error object {type=, message=} made by multiprocessing.errors. */
MP_API int mp_raise(lua_State *L, const char *type, const char *fmt, ...);
/* Raise an OSError object for a system call that failed with err: message
   "<fmt...>: strerror(err)", field errno = err (docs/design.md, decision
   11: resources that cannot be had raise this; expected outcomes return
   nil, reason). */
MP_API int mp_raise_errno(lua_State *L, int err, const char *fmt, ...);
/* Is the value at idx the error a signal's hook raised last in a wait
   (mp_interrupted)? Code that catches errors must let it go on. */
MP_API int mp_is_interrupt(lua_State *L, int idx);
/* Push an error object without raising it. */
MP_API void mp_pusherror(lua_State *L, const char *type, const char *fmt, ...);
/* An expected outcome: push nil, why; returns 2 (return mp_reason(L, "timeout")). */
MP_API int mp_reason(lua_State *L, const char *why);
/* Push a new boxed buffer and return it; freed by __gc/__close. */
MP_API mp_buf *mp_buf_push(lua_State *L, size_t cap);
/* Make room for n more bytes; raises on out of memory. Returns write pointer. */
MP_API char *mp_buf_reserve(lua_State *L, mp_buf *b, size_t n);
MP_API void mp_buf_add(lua_State *L, mp_buf *b, const void *p, size_t n);
/* Free a buffer's bytes and empty it (what its __gc does; also for an
   mp_buf embedded in another object). */
MP_API void mp_buf_free(mp_buf *b);
/* Absolute CLOCK_MONOTONIC time in seconds. */
MP_API double mp_now(void);
/* Timeout argument at index i: nil -> -1 (forever), number >= 0 -> seconds.
   Raises on a negative or non-number timeout. */
MP_API double mp_opttimeout(lua_State *L, int i);
/* Milliseconds left until deadline (deadline < 0 means forever -> -1),
   for poll(); never negative. */
MP_API int mp_remaining_ms(double deadline);
/* Deadline for a timeout from mp_opttimeout (-1 stays -1). */
MP_API double mp_deadline(double timeout);
/* Signals. A wait in C that a signal interrupted (EINTR), or that is about
   to sleep again, calls mp_interrupted(L): it lets a hook that a signal
   handler set to run at the next instruction run (lua5.4's SIGINT handler
   sets one that raises "interrupted!"; see ground.c). 1: the hook raised,
   its error is pushed: the caller puts its objects in order and
   lua_error()s; 0: nothing was raised (no such hook, a host without one,
   or a finalizer, where hooks do not run): the wait resumes with the time
   that is left. Cheap when no hook is set. L may be NULL (never
   interrupted). */
MP_API int mp_interrupted(lua_State *L);
/* The hot classes' check of their object (Queue, Connection, PoolCore):
   the full userdata at i if its block has at least size bytes and begins
   with magic (a uint64_t no address or user value takes), else NULL; no
   registry look-up (docs/design.md, "The layers"). A light userdata has
   no length and never passes. */
static inline void *mp_tomagic(lua_State *L, int i, size_t size, uint64_t magic) {
  void *p = lua_touserdata(L, i);
  if (p == NULL || lua_rawlen(L, i) < size || *(const uint64_t *)p != magic) return NULL;
  return p;
}
/* Register a class (in the manner of LuaSocket's auxiliar_newclass): its
   metatable is made with luaL_newmetatable(name) (so __name names it) and
   gets the metamethods of meta; its methods, the lists of the NULL-ended
   array methods (NULL: none), go to one table that is __index, or the
   only upvalue of index when given (a C closure that is __index then).
   With export, the methods table is also the module's field export, where
   Lua modules add methods. The module table is at -1; on return the
   metatable is pushed above it (the caller adds what is particular, then
   pops it). */
MP_API void mp_newclass(lua_State *L, const char *name, const luaL_Reg *const *methods,
                        const luaL_Reg *meta, lua_CFunction index, const char *export);
/* Add the functions of tests to core._test, the one table of the specs'
   test switches (made on first use; the module table at -1). */
MP_API void mp_add_tests(lua_State *L, const luaL_Reg *tests);
/* Close every fd of the list and empty it. */
MP_API void mp_fdlist_close(mp_fdlist *l);
/* Fill `to` with close-on-exec copies of the fds of `from` (not the same
   list): 0, or the errno of the copy that failed (`to` is then empty, the
   copies made closed). */
MP_API int mp_fdlist_dup(const mp_fdlist *from, mp_fdlist *to);
/* Pid of this process, refreshed after fork (cheap). */
MP_API int mp_getpid(void);
/* Set the cached pid: a forked child, first thing (process.c). */
MP_API void mp_setpid(int pid);
/* This process's start time (clock ticks since boot, low 32 bits), read
   once per process from /proc; 0 when /proc cannot be trusted (missing, or
   mounted from another pid namespace). With the pid it names a process
   even after the pid is reused. */
MP_API uint32_t mp_start_tag(void);
/* Is process pid gone: no such process, a zombie, or (tag & mask nonzero)
   a process whose start time & mask differs, i.e. the pid was reused? */
MP_API int mp_process_gone(int pid, uint32_t tag, uint32_t mask);
/* A start-time tag (within mask) that is neither tag nor 0: the specs'
   stand-in for a dead owner whose pid this live process got. */
MP_API uint32_t mp_other_tag(uint32_t tag, uint32_t mask);

/* -- process.c ------------------------------------------------------ */
/* A hook a forked child runs in C before its bootstrap enters Lua (it may
   leave with _exit there). */
typedef void (*mp_child_hook)(void *arg, int i);
/* Give the not yet started Process at idx the hook (NULL: none). */
MP_API void mp_process_set_hook(lua_State *L, int idx, mp_child_hook hook,
                                void *arg, int i);

/* -- fdpass.c: FdBox ------------------------------------------------ */
/* The fd of the FdBox at i (raises if it is not an open one). */
MP_API int mp_fdbox_fd(lua_State *L, int i);
/* Take the fd out of the FdBox at i, now the caller's; the box is closed. */
MP_API int mp_fdbox_take(lua_State *L, int i);

/* -- wire.c: the one frame of every stream, and the socket I/O -------- */
/* A frame: a 16-byte header (payload length u64, number of fds u32 that
   ride with its first bytes, kind u32), then the payload. */
#define MP_FRAME_HDR 16
/* The kinds of every stream in one list, so that none is misread. */
enum {
  MP_FRAME_BYTES, MP_FRAME_VALUE,   /* Connection: raw bytes, a codec message */
  /* a pool channel (pool.c, pool_worker.c; docs/pool.md), to a worker: */
  MP_FRAME_DEF, MP_FRAME_TASK, MP_FRAME_CLEAR, MP_FRAME_EXIT,
  /* and from it: */
  MP_FRAME_RESULT, MP_FRAME_RETIRE, MP_FRAME_INITFAIL
};
typedef struct mp_frame {
  uint64_t len;
  uint32_t nfds, kind;
} mp_frame;
/* Write a header at h (MP_FRAME_HDR bytes) / read the one at h. */
MP_API void mp_frame_put(char *h, uint64_t len, uint32_t nfds, uint32_t kind);
MP_API void mp_frame_get(const char *h, mp_frame *f);
/* What a send or a wait returns when a signal's hook raised
   (mp_interrupted): its error is pushed. Not an errno. */
#define MP_RAISED (-3)
struct iovec;
/* The one send loop: send the iovecs whole on a socket, fds (may be NULL)
   with the first bytes (SCM_RIGHTS), MSG_NOSIGNAL | flags; the iovecs are
   advanced past what went and *niov is what is left. 0, an errno (EAGAIN
   with MSG_DONTWAIT when the socket is full), or MP_RAISED: with L, a send
   that a signal interrupted (EINTR), or one about to block again after a
   partial write, lets the signal's hook run (*sent says whether any byte
   went). L NULL: resumes after EINTR. */
MP_API int mp_sendv(lua_State *L, int fd, struct iovec *iov, int *niov,
                    const mp_fdlist *fds, int flags, int *sent);
/* mp_sendv without L and flags, for short writes that do not block
   (Connection's own sends are interruptible). 0, or an errno. */
MP_API int mp_sendall(int fd, struct iovec *iov, int niov, const mp_fdlist *fds);
/* One recvmsg of up to len bytes into p, adding the fds that came to fds
   (beyond MP_MAX_FDS closed). >0 bytes, 0 at end of stream, -1 on error
   (errno; EAGAIN with MSG_DONTWAIT; EINTR too: the caller lets the
   signal's hook run, mp_interrupted, and reads again). *bad (unless
   NULL): the data or the control data was cut short, fds were closed
   past MP_MAX_FDS, or control data other than fds came. */
MP_API ssize_t mp_recv_fds(int fd, char *p, size_t len, int flags, mp_fdlist *fds,
                           int *bad);

/* -- conn.c: Connection -------------------------------------------- */
typedef struct mp_conn mp_conn;
/* Push a closed Connection; its socket comes with mp_conn_setfd, so that
   a raise in between leaks nothing. */
MP_API mp_conn *mp_conn_push(lua_State *L);
/* Give c the socket fd, owned from here (closed if this raises):
   readable, writable, unixsock (it can carry fds), trusted (0: decodes
   with MP_DECODE_UNTRUSTED until connection.lua's challenge passes). */
MP_API void mp_conn_setfd(lua_State *L, mp_conn *c, int fd, int readable,
                          int writable, int unixsock, int trusted);

/* -- shm.c ---------------------------------------------------------- */
/* Create a memfd segment of size bytes (zero-filled), mapped shared; its fd
   (close-on-exec) goes to *fd. Sealed against shrinking, and unless grows
   (a queue's ring) against growing. Raises on failure. name is for /proc
   only. */
MP_API void *mp_shm_create(lua_State *L, const char *name, size_t size,
                           int grows, int *fd);
/* Why the segment behind fd (as received by a handle) cannot be mapped,
   or NULL with its size in *size: it must be sealed against shrinking and
   at least min bytes. */
MP_API const char *mp_shm_check(int fd, size_t min, size_t *size);
/* Map the whole segment behind fd after mp_shm_check; NULL with *why set
   when it is refused or mmap fails. */
MP_API void *mp_shm_map(int fd, size_t min, size_t *size, const char **why);
/* The segment's size now (fstat): 0 or an errno. */
MP_API int mp_shm_size(int fd, size_t *size);
/* Make the segment at least size bytes (never smaller): 0 or an errno. */
MP_API int mp_shm_grow(int fd, size_t size);
MP_API void mp_shm_unmap(void *p, size_t size);
/* Wait while *addr == val, until deadline (mp_deadline(); -1 forever).
   Returns 0 when woken, else EAGAIN (value differed), ETIMEDOUT or EINTR. */
MP_API int mp_futex_wait(uint32_t *addr, uint32_t val, double deadline);
/* Wake up to n waiters on addr; returns how many were woken. */
MP_API int mp_futex_wake(uint32_t *addr, int n);
/* Sleep until the absolute CLOCK_MONOTONIC time t (seconds, as mp_now);
   0, or EINTR when a signal cut the sleep short. */
MP_API int mp_sleep_until(double t);

/* -- codec.c, codec_enc.c, codec_dec.c (and codec_impl.h, what only they
   share; codec.h, the format) ------------------------------------------ */
#define MP_DECODE_NOFUNCS 1   /* refuse functions (untrusted source) */
#define MP_DECODE_NOHANDLES 2 /* refuse handles: their fds (memfds that the
                                 sender can still truncate, sockets) must
                                 not come from a peer that proved no key */
/* What a connection whose peer proved no authkey decodes with. */
#define MP_DECODE_UNTRUSTED (MP_DECODE_NOFUNCS | MP_DECODE_NOHANDLES)
/* Serialize the value at idx and append it to b. Handles append their fds
   to fds (which may be NULL: then a handle raises). Raises
   SerializationError naming the path of what cannot be serialized. */
MP_API void mp_encode(lua_State *L, int idx, mp_buf *b, mp_fdlist *fds);
/* Decode a whole message and push its value. fds are the fds that came with
   the message; the decoder takes them over (a handle's rebuild owns its fd,
   the fds no handle took are closed). Raises SerializationError. */
MP_API void mp_decode(lua_State *L, const char *p, size_t len,
                      mp_fdlist *fds, int flags);
/* mp_encode with the name of the root in error paths (NULL: "value"),
   e.g. "args" gives "args[2].sock: cannot serialize userdata (FILE*)". */
MP_API void mp_encode_named(lua_State *L, int idx, mp_buf *b, mp_fdlist *fds,
                            const char *root);
/* Pop the function on the top and register it as the rebuild of handle
   kind `kind`: rebuild(state, fd...) -> object. Each C file's opener
   registers the kinds its classes reduce to (__mp_reduce); the codec opens
   first. */
MP_API void mp_register_handle(lua_State *L, const char *kind);
/* Most nested tables/functions/handles in one message, both ways. */
#define MP_CODEC_MAXDEPTH 200
/* mp_decode sets fds->n to 0: the fds are its own from then on. */

/* -- codec_scalar.c: the codec's fast path for one scalar (the same bytes
   as mp_encode's and mp_decode's) --------------------------------------- */
/* Push the value of the message p[0 .. len) if it is one well-formed
   scalar: 1; else 0, nothing pushed: the caller hands it to mp_decode
   (which decodes it, or raises saying what is wrong with it). */
MP_API int mp_decode_scalar(lua_State *L, const char *p, size_t len);
/* For transports that write a message in place (the queue's ring): */
/* Bytes of a boolean's or number's message, or of a string's head, at most. */
#define MP_CODEC_SCALAR_MAX 16
/* The message of the boolean or number at idx, written to out: its length;
   0 (nothing written that counts) for a value of another type. */
MP_API size_t mp_encode_number_at(lua_State *L, int idx, char *out);
/* The head of the message of a string of n bytes, written to out: its
   length. The message is the head, then the string's bytes. */
MP_API size_t mp_encode_strhead(size_t n, char *out);
/* If the message p[0, len) is one string, return 1 with the offset of
   its bytes in *off (they run to the end); else 0. */
MP_API int mp_decode_strhead(const char *p, size_t len, size_t *off);

/* -- sync.c, sharedctypes.c ----------------------------------------- */
#define MP_LOCK_T       "multiprocessing.Lock"
#define MP_RLOCK_T      "multiprocessing.RLock"
#define MP_SEMAPHORE_T  "multiprocessing.Semaphore"
#define MP_BSEMAPHORE_T "multiprocessing.BoundedSemaphore"
#define MP_CONDITION_T  "multiprocessing.Condition"
#define MP_EVENT_T      "multiprocessing.Event"
#define MP_BARRIER_T    "multiprocessing.Barrier"
#define MP_VALUE_T      "multiprocessing.Value"
#define MP_ARRAY_T      "multiprocessing.Array"
/* A Value that makes its own lock keeps its element (8 bytes) in the lock's
   segment, beside the lock word. Claim the slot of the Lock/RLock at idx
   for type code: returns a dup of the lock's segment fd, or -1 (slot taken
   or dup failed). mp_sync_slot: the slot in a mapped segment and its code,
   or NULL if seg is not a lock segment with a claimed slot. */
MP_API int mp_sync_claim_slot(lua_State *L, int idx, int code);
MP_API char *mp_sync_slot(void *seg, size_t size, int *code);

/* -- pool.c, pool_worker.c (and pool.h, what only they share) -------- */
/* The parent's side of a Pool: worker channels, epoll set, timer, shm. */
#define MP_POOL_T       "multiprocessing.PoolCore"
/* A worker's end of a pool (spawn, forkserver workers): a handle. */
#define MP_POOLWORKER_T "multiprocessing.PoolWorker"

/* -- *_open: each file registers its classes and adds its functions to the
   module table at the top of the stack. */
MP_API void mp_ground_open(lua_State *L);
MP_API void mp_osutil_open(lua_State *L);
MP_API void mp_fdpass_open(lua_State *L);
MP_API void mp_process_open(lua_State *L);
MP_API void mp_conn_open(lua_State *L);
MP_API void mp_listener_open(lua_State *L);
MP_API void mp_codec_open(lua_State *L);
MP_API void mp_shm_open(lua_State *L);
MP_API void mp_sync_open(lua_State *L);
MP_API void mp_sharedctypes_open(lua_State *L);   /* Value and Array */
MP_API void mp_queue_open(lua_State *L);
MP_API void mp_pool_open(lua_State *L);
MP_API void mp_pool_worker_open(lua_State *L);     /* after mp_pool_open */

#endif
