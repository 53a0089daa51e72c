/*
 * fuzz_decode.c: libFuzzer harness for the codec's decoder (csrc/codec_dec.c).
 *
 * One lua_State for the whole run, with multiprocessing.core opened and a
 * handle kind "fuzz" whose rebuild closes the fds it is given; the kinds
 * that the core's openers register (Lock, Connection, ...) get that
 * rebuild too, so that what is fuzzed is the decoder, not their rebuilds
 * given a forged state (which only a peer that proved the key can send). Each input
 * is decoded by mp_decode with MP_DECODE_NOFUNCS (bytecode is never loaded
 * from untrusted bytes: it can crash Lua itself) and two fds of /dev/null
 * beside it, under lua_pcall. A finding is: a crash or sanitizer report, an
 * error that is not a SerializationError, a stack not restored, or an fd
 * that the decoder neither gave to a handle nor closed.
 *
 * The codec's fast path for one boolean, number or string (codec_scalar.c)
 * reads the same input first: whatever it accepts, mp_decode must accept
 * too and decode to the same value, bit for bit, so that the two readers
 * of the one wire format never disagree.
 *
 * The queue's two readers of bytes that other processes write beside the
 * codec's (csrc/queue_chan.c) read each input too: a marked record's
 * marker and a descriptor-channel datagram. What they accept must be in
 * bounds (an fd count in 1..MP_MAX_FDS, a nonzero id, the sizes they
 * need), and a marked record's message after its marker is decoded as
 * the queue's get decodes it.
 *
 * The same input is then read as a pool frame's values (csrc/pool.h: what
 * a worker or the parent reads from the other end of its channel): its
 * first byte says how many of two fds (of /dev/null, queued as if they
 * had come with the frame) the frame claims (its header's nfds, 0..3),
 * the rest is values read by pool_get_value until the end, the values
 * that hold handles taking copies of the claimed fds. A finding is also:
 * an error that is neither "pool: corrupt message" nor a
 * SerializationError, a stack not restored, or an fd left open once the
 * frame's fds are released.
 *
 * Built and run by `make fuzz` (FUZZ_SECONDS, default 600) and `make
 * fuzz-ci` (60 s) from the repository root, on fuzz/corpus.
 */
#include "mp.h"
#include "queue.h"
#include "pool.h"
#include "multiprocessing.h"
#include "lualib.h"

#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static lua_State *L;

/* rebuild for kind "fuzz": close the fds, return {state} */
static int fuzz_rebuild(lua_State *L1) {
  int i, n = lua_gettop(L1);
  for (i = 2; i <= n; i++) close((int)lua_tointeger(L1, i));
  lua_createtable(L1, 1, 0);
  lua_pushvalue(L1, 1);
  lua_rawseti(L1, -2, 1);
  return 1;
}

static int decode(lua_State *L1) {
  const char *p = (const char *)lua_touserdata(L1, 1);
  size_t n = (size_t)lua_tointeger(L1, 2);
  mp_fdlist *fds = (mp_fdlist *)lua_touserdata(L1, 3);
  mp_decode(L1, p, n, fds, MP_DECODE_NOFUNCS);
  return 1;
}

/* decode(p, n) as mp_decode does, without fds, under pcall: 1 if it gave
   a value (pushed), else 0 (nothing pushed) */
static int decode_plain(lua_State *L1) {
  mp_fdlist none;
  none.n = 0;
  mp_decode(L1, (const char *)lua_touserdata(L1, 1),
            (size_t)lua_tointeger(L1, 2), &none, MP_DECODE_NOFUNCS);
  return 1;
}

/* pool_values(p, n, ff): claim p[0] % 4 of ff's fds, then read the
   values of p[1 .. n) as a frame's; pushes nothing */
static int pool_values(lua_State *L1) {
  const char *p = (const char *)lua_touserdata(L1, 1);
  const char *end = p + lua_tointeger(L1, 2);
  pool_fifo *ff = (pool_fifo *)lua_touserdata(L1, 3);
  if (p == end) return 0;
  pool_claim(L1, ff, (uint32_t)((unsigned char)*p % 4));
  p++;
  while (p < end) {
    p = pool_get_value(L1, p, end, ff);
    lua_pop(L1, 1);
  }
  return 0;
}

/* The lowest fd number free now. */
static int lowest_free(void) {
  int fd = fcntl(0, F_DUPFD, 0);
  if (fd >= 0) close(fd);
  return fd;
}

/* The input as a pool frame's values (see the head of this file). */
static void check_pool(const char *p, size_t size) {
  int top = lua_gettop(L), lo = lowest_free(), fd[2], st;
  pool_fifo ff;
  memset(&ff, 0, sizeof ff);
  ff.flags = MP_DECODE_NOFUNCS;
  fd[0] = open("/dev/null", O_RDONLY | O_CLOEXEC);
  fd[1] = open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (fd[0] < 0 || fd[1] < 0) abort();
  mp_buf_add(L, &ff.f, fd, sizeof fd);   /* as if they came with the frame */
  lua_pushcfunction(L, pool_values);
  lua_pushlightuserdata(L, (void *)(uintptr_t)p);
  lua_pushinteger(L, (lua_Integer)size);
  lua_pushlightuserdata(L, &ff);
  st = lua_pcall(L, 3, 0, 0);
  if (st != LUA_OK) {
    const char *type = NULL, *msg = lua_tostring(L, -1);
    if (lua_istable(L, -1)) {
      lua_getfield(L, -1, "type");
      type = lua_tostring(L, -1);
    }
    if ((type == NULL || strcmp(type, "SerializationError") != 0) &&
        (msg == NULL || strcmp(msg, "pool: corrupt message") != 0)) {
      lua_settop(L, top + 1);
      fprintf(stderr, "fuzz_decode: pool values: unexpected error: %s\n",
              luaL_tolstring(L, -1, NULL));
      abort();
    }
  }
  lua_settop(L, top);
  mp_pool_fifo_free(&ff);                /* the frame's fds, claimed or not */
  if (lowest_free() != lo) {
    fprintf(stderr, "fuzz_decode: pool values: an fd leaked\n");
    abort();
  }
}

/* Are the values at -1 and -2 the same, bit for bit? */
static int same_value(lua_State *L1) {
  if (lua_type(L1, -1) != lua_type(L1, -2)) return 0;
  if (lua_type(L1, -1) == LUA_TNUMBER) {
    if (lua_isinteger(L1, -1) != lua_isinteger(L1, -2)) return 0;
    if (lua_isinteger(L1, -1)) return lua_tointeger(L1, -1) == lua_tointeger(L1, -2);
    {
      lua_Number a = lua_tonumber(L1, -1), b = lua_tonumber(L1, -2);
      return memcmp(&a, &b, sizeof a) == 0;
    }
  }
  return lua_rawequal(L1, -1, -2);
}

/* The fast path against the codec (see the head of this file). */
static void check_scalar(const char *p, size_t size) {
  int top = lua_gettop(L);
  size_t off = 0;
  int isstr = mp_decode_strhead(p, size, &off);
  if (!mp_decode_scalar(L, p, size)) {
    if (isstr) {
      fprintf(stderr, "fuzz_decode: a string head but no scalar\n");
      abort();
    }
    return;
  }
  if (isstr && (off > size || lua_type(L, -1) != LUA_TSTRING ||
                lua_rawlen(L, -1) != size - off)) {
    fprintf(stderr, "fuzz_decode: string head and scalar disagree\n");
    abort();
  }
  lua_pushcfunction(L, decode_plain);
  lua_pushlightuserdata(L, (void *)(uintptr_t)p);
  lua_pushinteger(L, (lua_Integer)size);
  if (lua_pcall(L, 2, 1, 0) != LUA_OK || !same_value(L)) {
    fprintf(stderr, "fuzz_decode: the scalar fast path accepts what the "
            "codec reads otherwise\n");
    abort();
  }
  lua_settop(L, top);
}

/* The queue's marker and datagram readers (see the head of this file). */
static void check_queue_bytes(const char *p, size_t size) {
  uint64_t id = 0;
  int nfds = 0;
  if (mpq_mark_parse(p, size, &id, &nfds) &&
      (size < MARK_LEN || (unsigned char)p[0] != MARK_BYTE || id == 0 ||
       nfds < 1 || nfds > MP_MAX_FDS)) {
    fprintf(stderr, "fuzz_decode: a marker accepted out of bounds\n");
    abort();
  }
  if (mpq_dgram_parse(p, size, &id, &nfds) &&
      (size != DGRAM_LEN || id == 0 || nfds < 1 || nfds > MP_MAX_FDS)) {
    fprintf(stderr, "fuzz_decode: a datagram accepted out of bounds\n");
    abort();
  }
}

static void setup(void) {
  lua_Integer i, n;
  L = luaL_newstate();
  if (L == NULL) abort();
  luaL_openlibs(L);
  /* multiprocessing.errors from the source tree (run from the repo root) */
  if (luaL_dostring(L, "package.path = './lua/?.lua;' .. package.path "
                       "require 'multiprocessing.errors'") != LUA_OK) {
    fprintf(stderr, "fuzz_decode: %s (run from the repository root)\n",
            lua_tostring(L, -1));
    exit(2);
  }
  lua_settop(L, 0);
  luaL_requiref(L, "multiprocessing.core", luaopen_multiprocessing_core, 0);
  /* every kind the core's openers registered (mp_register_handle), and
     "fuzz" */
  lua_getfield(L, -1, "register_handle");      /* core, register_handle */
  lua_pushliteral(L, "fuzz");
  lua_pushcfunction(L, fuzz_rebuild);
  lua_call(L, 2, 0);
  lua_getfield(L, -1, "_test");
  lua_getfield(L, -1, "handle_kinds");
  lua_call(L, 0, 1);                           /* core, _test, kinds */
  n = (lua_Integer)lua_rawlen(L, -1);
  if (n < 10) {
    fprintf(stderr, "fuzz_decode: only %d handle kinds registered\n", (int)n);
    exit(2);
  }
  for (i = 1; i <= n; i++) {
    lua_getfield(L, 1, "register_handle");
    lua_rawgeti(L, -2, i);
    lua_pushcfunction(L, fuzz_rebuild);
    lua_call(L, 2, 0);
  }
  lua_settop(L, 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static unsigned long runs;
  mp_fdlist fds;
  int top, st, i, fd0, fd1;
  char *copy;
  if (L == NULL) setup();
  /* an exact-size copy, so that ASan sees any read past the end */
  copy = (char *)malloc(size ? size : 1);
  if (copy == NULL) abort();
  memcpy(copy, data, size);
  check_scalar(copy, size);
  check_pool(copy, size);
  check_queue_bytes(copy, size);
  /* a marked record: the message after its marker is what get decodes */
  if (size >= MARK_LEN && (unsigned char)copy[0] == MARK_BYTE) {
    memmove(copy, copy + MARK_LEN, size - MARK_LEN);
    size -= MARK_LEN;
  }
  fd0 = open("/dev/null", O_RDONLY | O_CLOEXEC);
  fd1 = open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (fd0 < 0 || fd1 < 0) abort();
  fds.n = 2;
  fds.fd[0] = fd0;
  fds.fd[1] = fd1;
  top = lua_gettop(L);
  lua_pushcfunction(L, decode);
  lua_pushlightuserdata(L, copy);
  lua_pushinteger(L, (lua_Integer)size);
  lua_pushlightuserdata(L, &fds);
  st = lua_pcall(L, 3, 1, 0);
  if (st != LUA_OK) {
    const char *type = NULL;
    if (lua_istable(L, -1)) {
      lua_getfield(L, -1, "type");
      type = lua_tostring(L, -1);
    }
    if (type == NULL || strcmp(type, "SerializationError") != 0) {
      lua_settop(L, top + 1);
      fprintf(stderr, "fuzz_decode: unexpected error: %s\n",
              luaL_tolstring(L, -1, NULL));
      abort();
    }
  }
  lua_settop(L, top + 1);
  lua_pop(L, 1);
  if (lua_gettop(L) != top) abort();
  /* both fds must be gone: closed by the decoder or by the rebuild */
  for (i = 0; i < 2; i++) {
    int fd = i ? fd1 : fd0;
    if (fcntl(fd, F_GETFD) != -1) {
      fprintf(stderr, "fuzz_decode: fd %d leaked\n", fd);
      abort();
    }
  }
  free(copy);
  if (++runs % 256 == 0) lua_gc(L, LUA_GCCOLLECT);
  return 0;
}
