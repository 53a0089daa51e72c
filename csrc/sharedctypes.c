/*
 * sharedctypes.c: Value and Array, typed C data in a memfd segment.
 *
 * A segment starts with a header (magic, type code, element size, count)
 * so that a process that receives only the fd can check and rebuild the
 * object; the elements follow, aligned to 16 bytes. A Value is an Array of
 * one element with its own metatable (v.value instead of a[i]).
 *
 * Each element is read and written with one relaxed atomic access of its
 * size, so a reader never sees a torn number; anything compound
 * (v.value = v.value + 1) needs the lock, which lives in the object's user
 * value (a Lock or RLock object, or false) and is not taken implicitly.
 *
 * The hot paths (v.value, a[i]) are C closures that check their object with
 * lua_touserdata, the block size and a magic number, and recognise the key
 * "value" by comparing it with an interned string kept as an upvalue.
 */
#include "mp.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define SHARED_MAGIC 0x4d5053484152u   /* "MPSHAR" */
#define SEG_MAGIC    0x6d707332u
#define HDR_SIZE     32

typedef struct seg_hdr {
  uint32_t magic;
  uint32_t code;      /* type code character */
  uint32_t esize;
  uint32_t isarray;
  uint64_t n;
} seg_hdr;

typedef struct mp_shared {
  uint64_t magic;
  int isarray;
  int fd;
  int owner;          /* pid of the process that mapped it */
  int code;
  size_t esize, n, size;
  void *mem;          /* NULL once closed */
  char *data;
} mp_shared;

typedef struct ctype {
  char code;
  const char *name;
  uint32_t size;
} ctype;

/* Python's codes; 'l'/'L' are C long (64-bit on LP64), 'c' is one byte
   read as a 1-byte string, '?' a boolean. */
static const ctype ctypes[] = {
  {'b', "int8", 1}, {'B', "uint8", 1}, {'h', "int16", 2},
  {'H', "uint16", 2}, {'i', "int32", 4}, {'I', "uint32", 4},
  {'l', "int64", 8}, {'L', "uint64", 8}, {'q', "int64", 8},
  {'Q', "uint64", 8}, {'f', "float", 4}, {'d', "double", 8},
  {'c', "char", 1}, {'?', "bool", 1}, {0, NULL, 0}
};

static const ctype *find_code(int code) {
  const ctype *t;
  for (t = ctypes; t->code; t++)
    if (t->code == code) return t;
  return NULL;
}

/* ---- element access ------------------------------------------------- */

#define RD(T, p)    __atomic_load_n((const T *)(p), __ATOMIC_RELAXED)
#define WR(T, p, v) __atomic_store_n((T *)(p), (T)(v), __ATOMIC_RELAXED)

/* A float or double is read and written whole, as the unsigned integer
   of its size. */
typedef union realbits {
  uint32_t u4;
  float f;
  uint64_t u8;
  double d;
} realbits;

static void push_elem(lua_State *L, int code, const char *p) {
  switch (code) {
    case 'b': lua_pushinteger(L, RD(int8_t, p)); break;
    case 'B': lua_pushinteger(L, RD(uint8_t, p)); break;
    case 'h': lua_pushinteger(L, RD(int16_t, p)); break;
    case 'H': lua_pushinteger(L, RD(uint16_t, p)); break;
    case 'i': lua_pushinteger(L, RD(int32_t, p)); break;
    case 'I': lua_pushinteger(L, RD(uint32_t, p)); break;
    case 'l': case 'q': lua_pushinteger(L, (lua_Integer)RD(int64_t, p)); break;
    case 'L': case 'Q':                   /* wraps past 2^63, as string.pack "J" */
      lua_pushinteger(L, (lua_Integer)RD(uint64_t, p)); break;
    case 'f': {
      realbits v;
      v.u4 = RD(uint32_t, p);
      lua_pushnumber(L, (lua_Number)v.f);
      break;
    }
    case 'd': {
      realbits v;
      v.u8 = RD(uint64_t, p);
      lua_pushnumber(L, (lua_Number)v.d);
      break;
    }
    case 'c': {
      char c = (char)RD(uint8_t, p);
      lua_pushlstring(L, &c, 1);
      break;
    }
    case '?': lua_pushboolean(L, RD(uint8_t, p) != 0); break;
  }
}

static int bad_value(lua_State *L, int code, int i, const char *expected) {
  const ctype *t = find_code(code);
  return luaL_error(L, "bad value for %s (%s expected, got %s)",
                    t ? t->name : "?", expected,
                    lua_type(L, i) == LUA_TNUMBER || lua_type(L, i) == LUA_TSTRING
                      ? lua_pushfstring(L, "%s", luaL_tolstring(L, i, NULL))
                      : luaL_typename(L, i));
}

static int get_int(lua_State *L, int code, int i, lua_Integer lo,
                   lua_Integer hi, lua_Integer *out, const char *what) {
  int isnum = 0;
  lua_Integer v = 0;
  if (lua_type(L, i) == LUA_TNUMBER) v = lua_tointegerx(L, i, &isnum);
  if (!isnum || v < lo || v > hi) return bad_value(L, code, i, what);
  *out = v;
  return 0;
}

static void write_elem(lua_State *L, int code, char *p, int i) {
  lua_Integer v;
  switch (code) {
    case 'b': get_int(L, code, i, INT8_MIN, INT8_MAX, &v, "integer in -128..127");
      WR(int8_t, p, v); break;
    case 'B': get_int(L, code, i, 0, UINT8_MAX, &v, "integer in 0..255");
      WR(uint8_t, p, v); break;
    case 'h': get_int(L, code, i, INT16_MIN, INT16_MAX, &v, "integer in -32768..32767");
      WR(int16_t, p, v); break;
    case 'H': get_int(L, code, i, 0, UINT16_MAX, &v, "integer in 0..65535");
      WR(uint16_t, p, v); break;
    case 'i': get_int(L, code, i, INT32_MIN, INT32_MAX, &v, "32-bit integer");
      WR(int32_t, p, v); break;
    case 'I': get_int(L, code, i, 0, UINT32_MAX, &v, "integer in 0..4294967295");
      WR(uint32_t, p, v); break;
    case 'l': case 'q': case 'L': case 'Q':
      get_int(L, code, i, LUA_MININTEGER, LUA_MAXINTEGER, &v, "integer");
      WR(uint64_t, p, (uint64_t)v); break;
    case 'f': case 'd': {
      int isnum = 0;
      lua_Number n = 0;
      realbits bits;
      if (lua_type(L, i) == LUA_TNUMBER) n = lua_tonumberx(L, i, &isnum);
      if (!isnum) bad_value(L, code, i, "number");
      if (code == 'f') {
        bits.f = (float)n;
        WR(uint32_t, p, bits.u4);
      } else {
        bits.d = (double)n;
        WR(uint64_t, p, bits.u8);
      }
      break;
    }
    case 'c': {
      size_t len;
      if (lua_type(L, i) == LUA_TSTRING) {
        const char *s = lua_tolstring(L, i, &len);
        if (len != 1) bad_value(L, code, i, "1-byte string");
        WR(uint8_t, p, (uint8_t)s[0]);
      } else {
        get_int(L, code, i, 0, UINT8_MAX, &v, "1-byte string or byte value");
        WR(uint8_t, p, v);
      }
      break;
    }
    case '?':
      if (lua_type(L, i) != LUA_TBOOLEAN) bad_value(L, code, i, "boolean");
      WR(uint8_t, p, lua_toboolean(L, i) ? 1 : 0);
      break;
  }
}

/* ---- userdata ------------------------------------------------------- */

static inline mp_shared *to_shared(lua_State *L, int i) {
  mp_shared *s = (mp_shared *)lua_touserdata(L, i);
  if (s == NULL || lua_rawlen(L, i) != sizeof(mp_shared) ||
      s->magic != SHARED_MAGIC)
    return NULL;
  return s;
}

/* Cheap check of argument i, rejecting a closed object. */
static inline mp_shared *check_shared(lua_State *L, int i) {
  mp_shared *s = to_shared(L, i);
  if (__builtin_expect(s != NULL && s->mem != NULL, 1)) return s;
  if (s == NULL) {
    luaL_typeerror(L, i, "Value or Array");
    return NULL;
  }
  if (s->mem == NULL) {
    luaL_error(L, "%s is closed", s->isarray ? "Array" : "Value");
    return NULL;
  }
  return s;
}

static void shared_release(mp_shared *s) {
  if (s->mem != NULL) mp_shm_unmap(s->mem, s->size);
  s->mem = NULL;
  s->data = NULL;
  if (s->fd >= 0) close(s->fd);
  s->fd = -1;
}

static mp_shared *shared_push(lua_State *L, int isarray) {
  mp_shared *s = (mp_shared *)lua_newuserdatauv(L, sizeof(mp_shared), 1);
  memset(s, 0, sizeof *s);
  s->magic = SHARED_MAGIC;
  s->isarray = isarray;
  s->fd = -1;
  s->owner = mp_getpid();
  luaL_setmetatable(L, isarray ? MP_ARRAY_T : MP_VALUE_T);
  return s;
}

/* Map fd as a Value living in a lock's slot: NULL, or why it cannot. */
static const char *map_slot(mp_shared *s, int fd) {
  size_t size = 0;
  const char *why;
  void *mem = mp_shm_map(fd, 1, &size, &why);
  int code = 0;
  char *slot;
  const ctype *t;
  if (mem == NULL) return why;
  slot = mp_sync_slot(mem, size, &code);
  t = slot ? find_code(code) : NULL;
  if (t == NULL) {
    mp_shm_unmap(mem, size);
    return "not a lock segment with a claimed slot";
  }
  s->isarray = 0;
  s->code = t->code;
  s->esize = t->size;
  s->n = 1;
  s->size = size;
  s->mem = mem;
  s->fd = fd;
  s->data = slot;
  return NULL;
}

/* core.shared_value_in_lock(code, lock) -> Value whose element lives in
   the (new) lock's segment, or nil if the lock has no free slot */
static int shared_value_in_lock(lua_State *L) {
  size_t len;
  const char *code = luaL_checklstring(L, 1, &len);
  const ctype *t = len == 1 ? find_code(code[0]) : NULL;
  mp_shared *s;
  const char *why;
  int fd;
  lua_settop(L, 2);
  if (t == NULL) return luaL_argerror(L, 1, "unknown type code");
  s = shared_push(L, 0);
  fd = mp_sync_claim_slot(L, 2, t->code);
  if (fd < 0) return 0;
  if ((why = map_slot(s, fd)) != NULL) {
    close(fd);
    return luaL_error(L, "cannot map the lock's segment: %s", why);
  }
  lua_pushvalue(L, 2);
  lua_setiuservalue(L, -2, 1);
  return 1;
}

/* core.shared_new(code, n, isarray, lock_or_false) -> Value | Array, zeroed
   (sharedctypes.lua validates and fills) */
static int shared_new(lua_State *L) {
  size_t len;
  const char *code = luaL_checklstring(L, 1, &len);
  lua_Integer n = luaL_checkinteger(L, 2);
  int isarray = lua_toboolean(L, 3);
  const ctype *t = len == 1 ? find_code(code[0]) : NULL;
  mp_shared *s;
  seg_hdr *h;
  int fd;
  lua_settop(L, 4);
  if (t == NULL) return luaL_argerror(L, 1, "unknown type code");
  luaL_argcheck(L, n >= 0 && (uint64_t)n < ((uint64_t)1 << 40) / t->size, 2,
                "size out of range");
  s = shared_push(L, isarray);
  s->code = t->code;
  s->esize = t->size;
  s->n = (size_t)n;
  s->size = HDR_SIZE + (size_t)n * t->size;
  s->mem = mp_shm_create(L, isarray ? "mp-Array" : "mp-Value", s->size, 0, &fd);
  s->fd = fd;
  s->data = (char *)s->mem + HDR_SIZE;
  h = (seg_hdr *)s->mem;
  h->magic = SEG_MAGIC;
  h->code = (uint32_t)t->code;
  h->esize = t->size;
  h->isarray = (uint32_t)isarray;
  h->n = (uint64_t)n;
  lua_pushvalue(L, 4);
  lua_setiuservalue(L, -2, 1);
  return 1;
}

/* core.shared_from_fd(fd, lock_or_false) -> Value | Array mapping fd (which
   it owns from now on, closed on failure); also the rebuild of the Value and
   Array handle kinds, as rebuild(lock_or_false, fd) (shared__reduce) */
static int shared_from_fd(lua_State *L);
static int shared_rebuild(lua_State *L) {
  lua_settop(L, 2);
  if (lua_isnil(L, 1)) { lua_pushboolean(L, 0); lua_replace(L, 1); }
  lua_rotate(L, 1, 1);                   /* fd, lock */
  return shared_from_fd(L);
}

static int shared_from_fd(lua_State *L) {
  int fd = (int)luaL_checkinteger(L, 1);
  size_t size = 0;
  const char *why = NULL;
  void *mem;
  seg_hdr h;
  const ctype *t = NULL;
  mp_shared *s;
  lua_settop(L, 2);
  s = shared_push(L, 0);
  if (map_slot(s, fd) == NULL) {         /* a Value in its lock's segment */
    lua_pushvalue(L, 2);
    lua_setiuservalue(L, -2, 1);
    return 1;
  }
  lua_pop(L, 1);
  /* the header is read once, here, and checked against the segment's size;
     the accessors use this process's copy of it */
  mem = mp_shm_map(fd, HDR_SIZE, &size, &why);
  if (mem != NULL) {
    memcpy(&h, mem, sizeof h);
    t = find_code((int)h.code);
    if (h.magic != SEG_MAGIC || t == NULL || h.esize != t->size || h.isarray > 1)
      why = "not such an object";
    else if (h.n > (size - HDR_SIZE) / t->size)
      why = "its memory is smaller than its header requires";
    if (why != NULL) {
      mp_shm_unmap(mem, size);
      mem = NULL;
    }
  }
  if (mem == NULL) {
    close(fd);
    return mp_raise(L, "SerializationError",
                    "cannot map a Value or Array from fd %d: %s", fd, why);
  }
  s = shared_push(L, (int)h.isarray);
  s->code = t->code;
  s->esize = t->size;
  s->n = (size_t)h.n;
  s->size = size;
  s->mem = mem;
  s->fd = fd;
  s->data = (char *)mem + HDR_SIZE;
  lua_pushvalue(L, 2);
  lua_setiuservalue(L, -2, 1);
  return 1;
}

/* Value __index(v, k): v.value, else a method */
/* The interned "value" of the state that loaded the module (kept alive as
   an upvalue of __index): a key is "value" when it is that very string.
   Another Lua state has its own, found by strcmp. */
static const char *value_key;

static int is_value_key(lua_State *L, int i) {
  const char *k = lua_tolstring(L, i, NULL);   /* a number key becomes a
                                                  string in its slot: harmless */
  return k != NULL && (k == value_key || strcmp(k, "value") == 0);
}

static int value__index(lua_State *L) {
  mp_shared *s = to_shared(L, 1);
  if (s != NULL && is_value_key(L, 2)) {
    if (s->mem == NULL) return luaL_error(L, "Value is closed");
    push_elem(L, s->code, s->data);
    return 1;
  }
  lua_pushvalue(L, 2);
  lua_rawget(L, lua_upvalueindex(1));
  return 1;
}

/* Value __newindex(v, k, x): v.value = x */
static int value__newindex(lua_State *L) {
  mp_shared *s = check_shared(L, 1);
  if (!is_value_key(L, 2))
    return luaL_error(L, "cannot set field '%s' of a Value (only 'value')",
                      luaL_tolstring(L, 2, NULL));
  write_elem(L, s->code, s->data, 3);
  return 0;
}

/* Array __index(a, i): a[i] (1-based), else a method */
static int array__index(lua_State *L) {
  mp_shared *s = to_shared(L, 1);
  int isint;
  lua_Integer i = lua_tointegerx(L, 2, &isint);
  if (s != NULL && isint && lua_type(L, 2) == LUA_TNUMBER) {
    if (s->mem == NULL) return luaL_error(L, "Array is closed");
    if (i < 1 || (lua_Unsigned)i > s->n)
      return luaL_error(L, "index %I out of range 1..%I", i, (lua_Integer)s->n);
    push_elem(L, s->code, s->data + (size_t)(i - 1) * s->esize);
    return 1;
  }
  if (lua_type(L, 2) == LUA_TNUMBER)
    return luaL_error(L, "bad Array index (integer expected, got %s)",
                      luaL_tolstring(L, 2, NULL));
  lua_pushvalue(L, 2);
  lua_rawget(L, lua_upvalueindex(1));
  return 1;
}

/* Array __newindex(a, i, x): a[i] = x (1-based) */
static int array__newindex(lua_State *L) {
  mp_shared *s = check_shared(L, 1);
  int isint;
  lua_Integer i = lua_tointegerx(L, 2, &isint);
  if (!isint || lua_type(L, 2) != LUA_TNUMBER)
    return luaL_error(L, "bad Array index (integer expected, got %s)",
                      luaL_typename(L, 2));
  if (i < 1 || (lua_Unsigned)i > s->n)
    return luaL_error(L, "index %I out of range 1..%I", i, (lua_Integer)s->n);
  write_elem(L, s->code, s->data + (size_t)(i - 1) * s->esize, 3);
  return 0;
}

/* #a -> number of elements */
static int array__len(lua_State *L) {
  mp_shared *s = check_shared(L, 1);
  lua_pushinteger(L, (lua_Integer)s->n);
  return 1;
}

/* a:totable([i [, j]]) -> list of a[i..j] (default the whole array) */
static int array_totable(lua_State *L) {
  mp_shared *s = check_shared(L, 1);
  lua_Integer i = luaL_optinteger(L, 2, 1);
  lua_Integer j = luaL_optinteger(L, 3, (lua_Integer)s->n), k;
  luaL_argcheck(L, i >= 1, 2, "out of range");
  luaL_argcheck(L, j <= (lua_Integer)s->n, 3, "out of range");
  lua_createtable(L, j >= i ? (int)(j - i + 1) : 0, 0);
  for (k = i; k <= j; k++) {
    push_elem(L, s->code, s->data + (size_t)(k - 1) * s->esize);
    lua_rawseti(L, -2, k - i + 1);
  }
  return 1;
}

/* v:get_lock() / a:get_lock() -> the Lock or RLock; raises without one */
static int shared_get_lock(lua_State *L) {
  mp_shared *s = check_shared(L, 1);
  lua_getiuservalue(L, 1, 1);
  if (!lua_toboolean(L, -1))
    return luaL_error(L, "this %s has no lock (made with lock=false, or a "
                         "Raw%s)", s->isarray ? "Array" : "Value",
                      s->isarray ? "Array" : "Value");
  return 1;
}

/* v:get_obj() -> v (the object is its own raw object) */
static int shared_get_obj(lua_State *L) {
  check_shared(L, 1);
  lua_settop(L, 1);
  return 1;
}

/* v:typecode() -> the Python type code, and the C type name */
static int shared_typecode(lua_State *L) {
  mp_shared *s = check_shared(L, 1);
  char c = (char)s->code;
  lua_pushlstring(L, &c, 1);
  lua_pushstring(L, find_code(s->code)->name);
  return 2;
}

/* obj:fileno() -> the segment's fd */
static int shared_fileno(lua_State *L) {
  mp_shared *s = check_shared(L, 1);
  lua_pushinteger(L, s->fd);
  return 1;
}

/* obj:close(): unmap and close this process's mapping; twice is fine */
static int shared_close(lua_State *L) {
  mp_shared *s = to_shared(L, 1);
  if (s == NULL) return luaL_typeerror(L, 1, "Value or Array");
  shared_release(s);
  return 0;
}

static int shared__gc(lua_State *L) {
  mp_shared *s = to_shared(L, 1);
  if (s != NULL) shared_release(s);
  return 0;
}

static int shared__tostring(lua_State *L) {
  mp_shared *s = to_shared(L, 1);
  const char *cls;
  if (s == NULL) return luaL_typeerror(L, 1, "Value or Array");
  cls = s->isarray ? "Array" : "Value";
  if (s->mem == NULL) {
    lua_pushfstring(L, "<%s(closed)>", cls);
  } else if (s->isarray) {
    lua_pushfstring(L, "<Array(%s, %I)>", find_code(s->code)->name,
                    (lua_Integer)s->n);
  } else {
    push_elem(L, s->code, s->data);
    lua_pushfstring(L, "<Value(%s, %s)>", find_code(s->code)->name,
                    luaL_tolstring(L, -1, NULL));
  }
  return 1;
}

/* __mp_reduce(obj) -> "Value" | "Array", lock_or_false, fd */
static int shared__reduce(lua_State *L) {
  mp_shared *s = check_shared(L, 1);
  lua_pushstring(L, s->isarray ? "Array" : "Value");
  lua_getiuservalue(L, 1, 1);
  lua_pushinteger(L, s->fd);
  return 3;
}

static const luaL_Reg shared_methods[] = {
  {"get_lock", shared_get_lock}, {"get_obj", shared_get_obj},
  {"typecode", shared_typecode}, {"fileno", shared_fileno},
  {"close", shared_close}, {NULL, NULL}
};

static const luaL_Reg shared_meta[] = {
  {"__gc", shared__gc}, {"__close", shared__gc}, {"__tostring", shared__tostring},
  {"__mp_reduce", shared__reduce}, {NULL, NULL}
};
static const luaL_Reg array_only[] = { {"totable", array_totable}, {NULL, NULL} };
static const luaL_Reg array_meta[] = {
  {"__newindex", array__newindex}, {"__len", array__len}, {NULL, NULL}
};

static void open_class(lua_State *L, const char *tname, int isarray) {
  if (isarray) {
    mp_newclass(L, tname, (const luaL_Reg *const[]){ shared_methods, array_only, NULL },
                shared_meta, array__index, "Array_methods");
    luaL_setfuncs(L, array_meta, 0);
  } else {                                  /* __index needs the key too */
    mp_newclass(L, tname, (const luaL_Reg *const[]){ shared_methods, NULL },
                shared_meta, NULL, "Value_methods");
    lua_getfield(L, -1, "__index");         /* mod, mt, methods */
    lua_pushliteral(L, "value");            /* mod, mt, methods, "value" */
    value_key = lua_tostring(L, -1);
    lua_pushcclosure(L, value__index, 2);
    lua_setfield(L, -2, "__index");
    lua_pushliteral(L, "value");
    lua_pushcclosure(L, value__newindex, 1);
    lua_setfield(L, -2, "__newindex");
  }
  lua_pop(L, 1);
}

/* core.ctype(name_or_code) -> code, name, size | nil */
static int shared_ctype(lua_State *L) {
  const char *k = luaL_checkstring(L, 1);
  const ctype *t;
  for (t = ctypes; t->code; t++)
    if ((k[0] == t->code && k[1] == '\0') || strcmp(k, t->name) == 0) {
      char c = t->code;
      lua_pushlstring(L, &c, 1);
      lua_pushstring(L, t->name);
      lua_pushinteger(L, t->size);
      return 3;
    }
  return 0;
}

MP_API void mp_sharedctypes_open(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"shared_new", shared_new},
    {"shared_from_fd", shared_from_fd},
    {"shared_value_in_lock", shared_value_in_lock},
    {"ctype", shared_ctype},
    {NULL, NULL}
  };
  open_class(L, MP_VALUE_T, 0);
  open_class(L, MP_ARRAY_T, 1);
  luaL_setfuncs(L, funcs, 0);
  lua_pushcfunction(L, shared_rebuild);
  mp_register_handle(L, "Value");
  lua_pushcfunction(L, shared_rebuild);
  mp_register_handle(L, "Array");
}
