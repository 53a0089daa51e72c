/*
 * codec.c: the one codec (docs/design.md, decision 3): any Lua value to a
 * message and back, for mp.dumps/mp.loads and every transport.
 *
 * A message is a version byte (CODEC_VERSION), a flags byte (F_REFS: the
 * message holds references, so the decoder must remember every table,
 * function and handle by id; without it, it remembers none), then one
 * value. A value starts with a tag byte:
 *   0x00 nil  0x01 false  0x02 true
 *   0x03 INT      zigzag varint (LEB128)
 *   0x04 FLOAT    8 bytes, IEEE 754 double, little-endian
 *   0x05 STR      varint length, bytes
 *   0x06 TABLE    u32 n, u32 m, then n values (keys 1..n), then m
 *                 key/value pairs (all other keys)
 *   0x07 TABLE_MT string (registered class name), then as TABLE
 *   0x08 REF      varint id: a table, Lua function or handle seen before
 *   0x09 GLOBALS  the receiver's global table
 *   0x0a MODULE   string: package.loaded[name] (required if need be)
 *   0x0b FN_REG   string: a function registered with mp.register
 *   0x0c FN_MOD   string module, string field: package.loaded[mod][field]
 *   0x0d FN_LUA   u32 length, bytecode (lua_dump, line info kept), varint
 *                 number of upvalues, then per upvalue 0x00 + value (a new
 *                 upvalue) or 0x01 + varint k (joined to the k-th upvalue
 *                 of the message: functions sharing an upvalue)
 *   0x0e HANDLE   string kind, varint nfds, nfds varint positions in the
 *                 message's fd list, then the state value
 *   0x40..0x5f    string of length tag - 0x40 (short strings inline)
 *   0x80..0xff    integer tag - 0x80 (0..127 inline)
 * Strings inside tags (names, kinds) are STR or short-string values.
 * Ids count tables (at creation, before their contents), Lua functions
 * (after the bytecode, before the upvalues) and handles (after the state),
 * in message order, on both sides, so shared references and cycles survive.
 *
 * The decoder treats its input as hostile: every read is bounds-checked,
 * nesting is limited (MAXDEPTH), a table's declared sizes are charged
 * against a budget of the message length (every slot needs a byte), so no
 * input makes it allocate more than a small multiple of its length, and
 * everything it allocates is owned by the Lua stack. Bytecode is loaded
 * only when functions are allowed: bytecode from a hostile source can crash
 * Lua itself, so untrusted input must be decoded with MP_DECODE_NOFUNCS.
 * A connection whose peer proved no key also refuses handles
 * (MP_DECODE_NOHANDLES): a handle maps memory whose fd the sender keeps.
 *
 * Encoder state lives on the C stack; the pointer hashes that find shared
 * tables spill into userdata on the Lua stack, so a raise leaks nothing.
 */
#include "mp.h"
#include "codec.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define MAXDEPTH MP_CODEC_MAXDEPTH
#define MP_CODEC_FDS_T "multiprocessing.codec.fds"

/* The codec's tables, in the registry under &envkey. */
static const char envkey = 'C';
enum {
  E_BYNAME = 1,   /* registered name -> class or function */
  E_BYVAL,        /* class or function -> registered name */
  E_KINDS,        /* handle kind -> rebuild function */
  E_MODOF,        /* module table or module function -> module name (weak) */
  E_KEYOF,        /* module function -> its field name (weak) */
  E_SIGN,         /* package.loaded signature when E_MODOF was built */
  E_SIGX,
  E_BUF,          /* a spare output buffer for mp.dumps, or nil */
  E_PACK,         /* function(...) return {...} end */
  E_DUMPS,        /* Lua function -> its bytecode (weak keys) */
  E_N = E_DUMPS
};

static void push_env(lua_State *L) {
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &envkey) == LUA_TTABLE) return;
  lua_pop(L, 1);
  lua_createtable(L, E_N, 0);
  lua_newtable(L); lua_rawseti(L, -2, E_BYNAME);
  lua_newtable(L); lua_rawseti(L, -2, E_BYVAL);
  lua_newtable(L); lua_rawseti(L, -2, E_KINDS);
  if (luaL_loadstring(L, "return {...}") != LUA_OK) lua_error(L);
  lua_rawseti(L, -2, E_PACK);
  lua_newtable(L);
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "k");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
  lua_rawseti(L, -2, E_DUMPS);
  lua_pushvalue(L, -1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &envkey);
}

/* ---- pointer hash (open addressing) ---------------------------------- */

typedef struct hslot { const void *k; uint32_t v; } hslot;

#define HINLINE 16
typedef struct phash {
  hslot *s;
  uint32_t mask, n;
  int slot;                 /* stack slot holding spilled storage */
  hslot inl[HINLINE];
} phash;

/* Empty until the first put (most messages need no hash at all). */
static void phash_init(phash *h, int slot) {
  h->s = NULL;
  h->mask = 0;
  h->n = 0;
  h->slot = slot;
}

static uint32_t hashp(const void *k) {
  uint64_t x = (uint64_t)(uintptr_t)k * 0x9E3779B97F4A7C15ull;
  return (uint32_t)(x >> 32);
}

static uint32_t phash_get(const phash *h, const void *k) {
  uint32_t i;
  if (h->s == NULL) return 0;
  i = hashp(k) & h->mask;
  for (;;) {
    if (h->s[i].k == k) return h->s[i].v;
    if (h->s[i].k == NULL) return 0;
    i = (i + 1) & h->mask;
  }
}

static void phash_put(lua_State *L, phash *h, const void *k, uint32_t v) {
  uint32_t i;
  if (h->s == NULL) {
    memset(h->inl, 0, sizeof h->inl);
    h->s = h->inl;
    h->mask = HINLINE - 1;
  }
  if ((h->n + 1) * 4 > (h->mask + 1) * 3) {   /* grow into a userdata */
    uint32_t cap = (h->mask + 1) * 2, j;
    hslot *s;
    if (cap > (1u << 28)) luaL_error(L, "too many objects to serialize");
    s = (hslot *)lua_newuserdatauv(L, cap * sizeof(hslot), 0);
    memset(s, 0, cap * sizeof(hslot));
    for (j = 0; j <= h->mask; j++) {
      if (h->s[j].k) {
        i = hashp(h->s[j].k) & (cap - 1);
        while (s[i].k) i = (i + 1) & (cap - 1);
        s[i] = h->s[j];
      }
    }
    lua_replace(L, h->slot);                   /* old storage is garbage */
    h->s = s;
    h->mask = cap - 1;
  }
  i = hashp(k) & h->mask;
  while (h->s[i].k) i = (i + 1) & h->mask;
  h->s[i].k = k;
  h->s[i].v = v;
  h->n++;
}

/* ---- encoder ----------------------------------------------------------- */

/* Where a value sits, as a chain of segments on the C stack, for errors. */
enum { S_INDEX, S_KEY, S_KEYOF, S_UPVAL, S_STATE };
typedef struct seg {
  const struct seg *up;
  int kind;
  int sidx;              /* S_KEY, S_KEYOF: stack index of the key */
  lua_Integer i;         /* S_INDEX: the index */
  const char *name;      /* S_UPVAL: upvalue name; S_STATE: handle kind */
} seg;

typedef struct enc {
  lua_State *L;
  mp_buf *b;
  mp_fdlist *fds;
  const char *root;
  const seg *path;
  int depth;
  int globals, byval, modof, keyof, env;   /* stack slots */
  int modchecked;          /* module map: 0 not yet, 1 as cached, 2 checked */
  int infunc;              /* > 0 while encoding a function's upvalues */
  int flags;               /* header flags (F_REFS) */
  uint32_t nref, nuv;
  phash seen, uvs;
} enc;

static void enc_value(enc *e, int idx);
static void enc_typed(enc *e, int idx, int type);

/* Step into a child: s (on the caller's C stack) becomes the innermost
   segment until seg_pop. A raise unwinds e with it, so nothing dangles. */
static void seg_push(enc *e, seg *s, int kind) {
  s->up = e->path;
  s->kind = kind;
  e->path = s;
}

static void seg_pop(enc *e, const seg *s) { e->path = s->up; }

static unsigned char *wr(enc *e, size_t n) {
  mp_buf *b = e->b;
  if (b->cap - b->len < n) mp_buf_reserve(e->L, b, n);
  return (unsigned char *)b->data + b->len;
}

static size_t put_varint(unsigned char *w, uint64_t v) {
  size_t n = 0;
  while (v >= 0x80) {
    w[n++] = (unsigned char)(v | 0x80);
    v >>= 7;
  }
  w[n++] = (unsigned char)v;
  return n;
}

static void put_u32(unsigned char *w, uint32_t v) {
  w[0] = (unsigned char)v; w[1] = (unsigned char)(v >> 8);
  w[2] = (unsigned char)(v >> 16); w[3] = (unsigned char)(v >> 24);
}

static void enc_byte(enc *e, int c) {
  *wr(e, 1) = (unsigned char)c;
  e->b->len++;
}

static void enc_tagvarint(enc *e, int tag, uint64_t v) {
  unsigned char *w = wr(e, 11);
  w[0] = (unsigned char)tag;
  e->b->len += 1 + put_varint(w + 1, v);
}

static void enc_str(enc *e, const char *s, size_t n) {
  unsigned char *w = wr(e, n + 11);
  if (n <= SHORTSTR_MAX) {
    w[0] = (unsigned char)(T_SHORTSTR + n);
    memcpy(w + 1, s, n);
    e->b->len += 1 + n;
  } else {
    size_t k;
    w[0] = T_STR;
    k = 1 + put_varint(w + 1, n);
    memcpy(w + k, s, n);
    e->b->len += k + n;
  }
}

static void enc_int(enc *e, lua_Integer i) {
  if (i >= 0 && i < 0x80) {
    enc_byte(e, T_FIXINT | (int)i);
  } else {
    uint64_t u = (uint64_t)i;
    enc_tagvarint(e, T_INT, (u << 1) ^ (i < 0 ? ~(uint64_t)0 : 0));
  }
}

static void enc_float(enc *e, lua_Number x) {
  unsigned char *w = wr(e, 9);
  double d = (double)x;
  uint64_t u;
  memcpy(&u, &d, 8);
  w[0] = T_FLOAT;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  memcpy(w + 1, &u, 8);
#else
  { int j; for (j = 0; j < 8; j++) w[1 + j] = (unsigned char)(u >> (8 * j)); }
#endif
  e->b->len += 9;
}

/* Append one path segment's text to B. */
static void add_seg(lua_State *L, luaL_Buffer *B, const seg *s) {
  char tmp[64];
  switch (s->kind) {
  case S_INDEX:
    snprintf(tmp, sizeof tmp, "[%lld]", (long long)s->i);
    luaL_addstring(B, tmp);
    break;
  case S_KEY: {
    int t = lua_type(L, s->sidx);
    if (t == LUA_TSTRING) {
      size_t n, j;
      const char *k = lua_tolstring(L, s->sidx, &n);
      int ident = n > 0 && n <= 40 && !(k[0] >= '0' && k[0] <= '9');
      for (j = 0; j < n && ident; j++)
        ident = (k[j] == '_' || (k[j] >= 'a' && k[j] <= 'z') ||
                 (k[j] >= 'A' && k[j] <= 'Z') || (k[j] >= '0' && k[j] <= '9'));
      if (ident) {
        luaL_addchar(B, '.');
        luaL_addlstring(B, k, n);
      } else {
        luaL_addstring(B, "[\"");
        luaL_addlstring(B, k, n > 40 ? 40 : n);
        luaL_addstring(B, n > 40 ? "...\"]" : "\"]");
      }
    } else if (t == LUA_TNUMBER || t == LUA_TBOOLEAN) {
      luaL_addchar(B, '[');
      luaL_tolstring(L, s->sidx, NULL);
      luaL_addvalue(B);
      luaL_addchar(B, ']');
    } else {
      snprintf(tmp, sizeof tmp, "[<%s>]", lua_typename(L, t));
      luaL_addstring(B, tmp);
    }
    break;
  }
  case S_KEYOF:
    luaL_addstring(B, "[<key>]");
    break;
  case S_UPVAL:
    luaL_addstring(B, "(upvalue ");
    luaL_addstring(B, s->name);
    luaL_addchar(B, ')');
    break;
  case S_STATE:
    luaL_addstring(B, "(state of ");
    luaL_addstring(B, s->name);
    luaL_addchar(B, ')');
    break;
  }
}

/* Raise SerializationError "path: cannot serialize what". */
static int enc_fail(enc *e, const char *what) {
  lua_State *L = e->L;
  const seg *chain[MAXDEPTH * 2 + 8];
  int n = 0;
  const seg *s;
  luaL_Buffer B;
  luaL_checkstack(L, 8, NULL);
  for (s = e->path; s && n < (int)(sizeof chain / sizeof *chain); s = s->up)
    chain[n++] = s;
  lua_pushstring(L, what);            /* keep what alive */
  luaL_buffinit(L, &B);
  luaL_addstring(&B, e->root);
  while (n > 0) add_seg(L, &B, chain[--n]);
  luaL_pushresult(&B);
  return mp_raise(L, "SerializationError", "%s: cannot serialize %s",
                  lua_tostring(L, -1), lua_tostring(L, -2));
}

/* Name of a metatable for messages: its __name, or "?". Pushes it. */
static const char *push_mtname(lua_State *L, int mt) {
  if (lua_getfield(L, mt, "__name") != LUA_TSTRING) {
    lua_pop(L, 1);
    lua_pushliteral(L, "no __name");
  }
  return lua_tostring(L, -1);
}

/* The module maps (module table or function -> name). fresh: make sure
   they match package.loaded (rebuilt when the set of loaded modules
   changed; checked at most once per call), as for functions and for what
   their upvalues hold; otherwise the map as last built will do (plain data
   is not worth a scan of package.loaded per message), built if none. */
static void modmap_check(enc *e, int fresh) {
  lua_State *L = e->L;
  lua_Integer count = 0, sigx = 0;
  int loaded, modof, keyof;
  if (e->modchecked == 2 || (e->modchecked == 1 && !fresh)) return;
  luaL_checkstack(L, 12, NULL);
  if (!fresh) {
    int t1 = lua_rawgeti(L, e->env, E_MODOF);
    int t2 = lua_rawgeti(L, e->env, E_KEYOF);
    if (t1 == LUA_TTABLE && t2 == LUA_TTABLE) {
      lua_replace(L, e->keyof);          /* the map as last built */
      lua_replace(L, e->modof);
      e->modchecked = 1;
      return;
    }
    lua_pop(L, 2);
  }
  e->modchecked = 2;
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  loaded = lua_gettop(L);
  if (!lua_istable(L, loaded)) {          /* no package library */
    lua_newtable(L);
    lua_replace(L, e->modof);
    lua_newtable(L);
    lua_replace(L, e->keyof);
    lua_pop(L, 1);
    return;
  }
  lua_pushnil(L);
  while (lua_next(L, loaded)) {
    count++;
    sigx ^= (lua_Integer)(uintptr_t)lua_topointer(L, -1) * 31 + count;
    lua_pop(L, 1);
  }
  if (lua_rawgeti(L, e->env, E_SIGN) == LUA_TNUMBER &&
      lua_tointeger(L, -1) == count &&
      lua_rawgeti(L, e->env, E_SIGX) == LUA_TNUMBER &&
      lua_tointeger(L, -1) == sigx &&
      lua_rawgeti(L, e->env, E_MODOF) == LUA_TTABLE &&
      lua_rawgeti(L, e->env, E_KEYOF) == LUA_TTABLE) {
    lua_replace(L, e->keyof);
    lua_replace(L, e->modof);
    lua_settop(L, loaded - 1);
    return;
  }
  lua_settop(L, loaded);
  /* weak-keyed maps, so that unloaded modules can go */
  lua_newtable(L);
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "k");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
  modof = lua_gettop(L);
  lua_newtable(L);
  lua_getmetatable(L, modof);
  lua_setmetatable(L, -2);
  keyof = lua_gettop(L);
  lua_pushnil(L);
  while (lua_next(L, loaded)) {          /* loaded, modof, keyof, mod, M */
    size_t nmod;
    const char *mod;
    int M = lua_gettop(L);
    if (lua_type(L, M - 1) != LUA_TSTRING || !lua_istable(L, M)) {
      lua_pop(L, 1);
      continue;
    }
    mod = lua_tolstring(L, M - 1, &nmod);
    lua_pushvalue(L, M);
    if (lua_rawget(L, modof) == LUA_TSTRING) {   /* keep the shorter name */
      size_t no;
      const char *old = lua_tolstring(L, -1, &no);
      if (no < nmod || (no == nmod && strcmp(old, mod) <= 0)) {
        lua_pop(L, 1);
        goto fields;
      }
    }
    lua_pop(L, 1);
    lua_pushvalue(L, M);
    lua_pushvalue(L, M - 1);
    lua_rawset(L, modof);
  fields:
    lua_pushnil(L);
    while (lua_next(L, M)) {             /* ..., mod, M, k, v */
      if (lua_type(L, -2) == LUA_TSTRING && lua_isfunction(L, -1)) {
        size_t nk;
        const char *k = lua_tolstring(L, -2, &nk);
        int better = 1;
        lua_pushvalue(L, -1);
        if (lua_rawget(L, modof) == LUA_TSTRING) {
          size_t nm2, nk2;
          const char *m2 = lua_tolstring(L, -1, &nm2), *k2;
          lua_pushvalue(L, -2);
          lua_rawget(L, keyof);
          k2 = lua_tolstring(L, -1, &nk2);
          if (k2 == NULL) better = 1;
          else if (nm2 + nk2 != nmod + nk) better = nmod + nk < nm2 + nk2;
          else {
            int c = strcmp(mod, m2);
            better = c < 0 || (c == 0 && strcmp(k, k2) < 0);
          }
          lua_pop(L, 1);
        }
        lua_pop(L, 1);
        if (better) {
          lua_pushvalue(L, -1);
          lua_pushvalue(L, M - 1);
          lua_rawset(L, modof);
          lua_pushvalue(L, -1);
          lua_pushvalue(L, -3);
          lua_rawset(L, keyof);
        }
      }
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
  lua_pushvalue(L, modof);
  lua_rawseti(L, e->env, E_MODOF);
  lua_pushvalue(L, keyof);
  lua_rawseti(L, e->env, E_KEYOF);
  lua_pushinteger(L, count);
  lua_rawseti(L, e->env, E_SIGN);
  lua_pushinteger(L, sigx);
  lua_rawseti(L, e->env, E_SIGX);
  lua_replace(L, e->keyof);
  lua_replace(L, e->modof);
  lua_settop(L, loaded - 1);
}

/* If the value at idx is a module (table) or module function, push its
   module name (and, for a function, its field name) and return 1. */
static int module_name(enc *e, int idx, int isfunc) {
  lua_State *L = e->L;
  modmap_check(e, isfunc || e->infunc > 0);
  lua_pushvalue(L, idx);
  if (lua_rawget(L, e->modof) != LUA_TSTRING) {
    lua_pop(L, 1);
    return 0;
  }
  if (!isfunc) {                         /* still that module? */
    lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    lua_pushvalue(L, -2);
    lua_rawget(L, -2);
    if (lua_rawequal(L, -1, idx)) {
      lua_pop(L, 2);
      return 1;
    }
    lua_pop(L, 3);
    return 0;
  }
  lua_pushvalue(L, idx);
  lua_rawget(L, e->keyof);               /* mod, key */
  /* still there? (a module may have replaced the field since) */
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_pushvalue(L, -3);
  if (lua_rawget(L, -2) == LUA_TTABLE) {
    lua_pushvalue(L, -3);
    lua_rawget(L, -2);
    if (lua_rawequal(L, -1, idx)) {
      lua_pop(L, 3);
      return 1;
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 4);
  /* stale: rebuild once and look again */
  lua_pushnil(L);
  lua_rawseti(L, e->env, E_SIGN);
  e->modchecked = 0;
  modmap_check(e, 1);
  lua_pushvalue(L, idx);
  if (lua_rawget(L, e->modof) != LUA_TSTRING) {
    lua_pop(L, 1);
    return 0;
  }
  lua_pushvalue(L, idx);
  lua_rawget(L, e->keyof);
  return 1;
}

static void enc_ref(enc *e, uint32_t id) {
  e->flags |= F_REFS;
  enc_tagvarint(e, T_REF, id);
}

static void enter(enc *e) {
  if (++e->depth > MAXDEPTH) {
    char what[64];
    snprintf(what, sizeof what, "value nested more than %d levels deep",
             MAXDEPTH);
    enc_fail(e, what);
  }
  luaL_checkstack(e->L, 8, "nesting");
}

/* Table contents: the sequence 1..n (up to the first nil) read with
   lua_rawgeti, then the other pairs. Every Lua API call costs about the
   same, so the common case is kept to four per element: the sequence pass
   (rawgeti, tonumber) and a counting traversal (next, pop) that proves
   there is no other key; only a table with other keys is traversed a third
   time to encode them. */
static void enc_table_body(enc *e, int idx) {
  lua_State *L = e->L;
  lua_Integer n = (lua_Integer)lua_rawlen(L, idx), i, cnt = 0;
  int base = lua_gettop(L);
  size_t at;
  uint32_t m = 0;
  seg s;
  if (n > 0x7ffffffe) n = 0x7ffffffe;
  wr(e, 8);
  at = e->b->len;                        /* u32 n, u32 m, patched below */
  e->b->len += 8;
  seg_push(e, &s, S_INDEX);
  luaL_checkstack(L, 70, NULL);
  for (i = 1; i <= n; i++) {
    int t = lua_rawgeti(L, idx, i);
    if (t == LUA_TNUMBER) {              /* lists of numbers */
      lua_Number x = lua_tonumber(L, -1);
      /* only an integral value may be an integer: one call less for floats */
      if (x >= -9.2e18 && x <= 9.2e18 && x == (lua_Number)(lua_Integer)x &&
          lua_isinteger(L, -1))
        enc_int(e, lua_tointeger(L, -1));
      else
        enc_float(e, x);
    } else if (t == LUA_TNIL) {          /* a hole: the sequence ends */
      n = i - 1;
      break;
    } else {
      s.i = i;
      enc_value(e, lua_gettop(L));
    }
    if ((i & 63) == 0) lua_settop(L, base);
  }
  lua_settop(L, base);
  lua_pushnil(L);                        /* any key besides 1..n? */
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    if (++cnt > n) break;
  }
  lua_settop(L, base);
  if (cnt > n) {
    lua_pushnil(L);
    while (lua_next(L, idx)) {           /* key at base+1, value at base+2 */
      int kt = lua_type(L, base + 1);
      if (kt == LUA_TNUMBER) {
        int isint;
        lua_Integer k = lua_tointegerx(L, base + 1, &isint);
        if (isint && k >= 1 && k <= n) {
          lua_pop(L, 1);
          continue;
        }
      }
      s.kind = S_KEYOF;
      s.sidx = base + 1;
      enc_typed(e, base + 1, kt);
      s.kind = S_KEY;
      enc_value(e, base + 2);
      lua_pop(L, 1);
      if (++m == 0xffffffffu) enc_fail(e, "table (too many keys)");
    }
  }
  seg_pop(e, &s);
  put_u32((unsigned char *)e->b->data + at, (uint32_t)n);
  put_u32((unsigned char *)e->b->data + at + 4, m);
}

/* A value whose metatable has __mp_reduce (at the top): a handle. Pops it. */
static void enc_handle(enc *e, int idx) {
  lua_State *L = e->L;
  int base = lua_gettop(L) - 1, nres, nfds, j;
  uint32_t pos[MP_MAX_FDS];
  const void *p = lua_topointer(L, idx);
  size_t klen;
  const char *kind;
  seg s;
  lua_pushvalue(L, idx);                 /* reduce, obj */
  lua_call(L, 1, LUA_MULTRET);           /* kind, state, fd... */
  nres = lua_gettop(L) - base;
  if (nres < 1 || lua_type(L, base + 1) != LUA_TSTRING)
    enc_fail(e, "handle (its __mp_reduce did not return a kind string)");
  lua_settop(L, base + (nres < 2 ? 2 : nres));
  kind = lua_tolstring(L, base + 1, &klen);
  nfds = nres < 2 ? 0 : nres - 2;
  if (nfds > 0 && e->fds == NULL) {
    char what[160];
    snprintf(what, sizeof what, "%.60s handle here (this transport cannot "
             "carry file descriptors)", kind);
    enc_fail(e, what);
  }
  for (j = 0; j < nfds; j++) {
    int isnum, k;
    lua_Integer fd = lua_tointegerx(L, base + 3 + j, &isnum);
    if (!isnum || fd < 0 || fd > INT_MAX)
      enc_fail(e, "handle (its __mp_reduce returned a bad fd)");
    for (k = 0; k < e->fds->n && e->fds->fd[k] != (int)fd; k++) {}
    if (k == e->fds->n) {
      if (e->fds->n >= MP_MAX_FDS) {
        char what[96];
        snprintf(what, sizeof what, "handle: more than %d file descriptors "
                 "in one message", MP_MAX_FDS);
        enc_fail(e, what);
      }
      e->fds->fd[e->fds->n++] = (int)fd;
    }
    pos[j] = (uint32_t)k;
  }
  enter(e);
  enc_byte(e, T_HANDLE);
  enc_str(e, kind, klen);
  {
    unsigned char *w = wr(e, 11 + 5 * (size_t)nfds);
    size_t k = put_varint(w, (uint64_t)nfds);
    for (j = 0; j < nfds; j++) k += put_varint(w + k, pos[j]);
    e->b->len += k;
  }
  s.name = kind;
  seg_push(e, &s, S_STATE);
  enc_value(e, base + 2);
  seg_pop(e, &s);
  e->depth--;
  phash_put(L, &e->seen, p, ++e->nref);
  lua_settop(L, base);
}

static void enc_table(enc *e, int idx) {
  lua_State *L = e->L;
  const void *p = lua_topointer(L, idx);
  uint32_t id = phash_get(&e->seen, p);
  if (id) { enc_ref(e, id); return; }
  if (lua_rawequal(L, idx, e->globals)) { enc_byte(e, T_GLOBALS); return; }
  if (module_name(e, idx, 0)) {
    size_t n;
    const char *name = lua_tolstring(L, -1, &n);
    enc_byte(e, T_MODULE);
    enc_str(e, name, n);
    lua_pop(L, 1);
    return;
  }
  if (lua_getmetatable(L, idx)) {
    int mt = lua_gettop(L);
    size_t n;
    const char *name;
    if (lua_getfield(L, mt, "__mp_reduce") != LUA_TNIL) {
      lua_remove(L, mt);
      enc_handle(e, idx);
      return;
    }
    lua_pop(L, 1);
    lua_pushvalue(L, mt);
    if (lua_rawget(L, e->byval) != LUA_TSTRING || lua_isfunction(L, mt)) {
      char what[160];
      snprintf(what, sizeof what, "table with an unregistered metatable "
               "(%.60s; register it with mp.register)", push_mtname(L, mt));
      enc_fail(e, what);
    }
    name = lua_tolstring(L, -1, &n);
    enter(e);
    enc_byte(e, T_TABLE_MT);
    enc_str(e, name, n);
    lua_settop(L, mt - 1);
  } else {
    enter(e);
    enc_byte(e, T_TABLE);
  }
  phash_put(L, &e->seen, p, ++e->nref);
  enc_table_body(e, idx);
  e->depth--;
}

static int dump_writer(lua_State *L, const void *p, size_t n, void *ud) {
  mp_buf_add(L, (mp_buf *)ud, p, n);
  return 0;
}

static void enc_function(enc *e, int idx) {
  lua_State *L = e->L;
  const void *p = lua_topointer(L, idx);
  uint32_t id = phash_get(&e->seen, p), nups, i;
  size_t at;
  seg s;
  if (id) { enc_ref(e, id); return; }
  lua_pushvalue(L, idx);
  if (lua_rawget(L, e->byval) == LUA_TSTRING) {
    size_t n;
    const char *name = lua_tolstring(L, -1, &n);
    enc_byte(e, T_FN_REG);
    enc_str(e, name, n);
    lua_pop(L, 1);
    return;
  }
  lua_pop(L, 1);
  if (module_name(e, idx, 1)) {          /* mod, key */
    size_t n;
    const char *s1 = lua_tolstring(L, -2, &n);
    enc_byte(e, T_FN_MOD);
    enc_str(e, s1, n);
    s1 = lua_tolstring(L, -1, &n);
    enc_str(e, s1, n);
    lua_pop(L, 2);
    return;
  }
  if (lua_iscfunction(L, idx))
    enc_fail(e, "C function (it is not a field of a loaded module; "
             "register it with mp.register)");
  enter(e);
  enc_byte(e, T_FN_LUA);
  wr(e, 4);
  at = e->b->len;
  e->b->len += 4;
  /* the bytecode of a closure never changes: cached per closure (weak),
     since a pool sends the same function with every task */
  lua_rawgeti(L, e->env, E_DUMPS);
  lua_pushvalue(L, idx);
  if (lua_rawget(L, -2) == LUA_TSTRING) {
    size_t n;
    const char *code = lua_tolstring(L, -1, &n);
    mp_buf_add(L, e->b, code, n);
  } else {
    lua_pop(L, 1);
    lua_pushvalue(L, idx);
    lua_dump(L, dump_writer, e->b, 0);   /* keep line info for tracebacks */
    lua_pop(L, 1);
    lua_pushvalue(L, idx);
    lua_pushlstring(L, e->b->data + at + 4, e->b->len - at - 4);
    lua_rawset(L, -3);
    lua_pushnil(L);
  }
  lua_pop(L, 2);
  if (e->b->len - at - 4 > 0xffffffffu) enc_fail(e, "function (too large)");
  put_u32((unsigned char *)e->b->data + at, (uint32_t)(e->b->len - at - 4));
  phash_put(L, &e->seen, p, ++e->nref);
  for (nups = 0; lua_getupvalue(L, idx, (int)nups + 1) != NULL; nups++)
    lua_pop(L, 1);
  {
    unsigned char *w = wr(e, 10);
    e->b->len += put_varint(w, nups);
  }
  seg_push(e, &s, S_UPVAL);
  e->infunc++;
  for (i = 1; i <= nups; i++) {
    const void *uid = lua_upvalueid(L, idx, (int)i);
    uint32_t k = phash_get(&e->uvs, uid);
    if (k) {                             /* shared with an earlier closure */
      enc_tagvarint(e, 1, k);
      continue;
    }
    phash_put(L, &e->uvs, uid, ++e->nuv);
    enc_byte(e, 0);
    s.name = lua_getupvalue(L, idx, (int)i);
    if (s.name == NULL || *s.name == '\0') s.name = "?";
    if (strcmp(s.name, "_ENV") == 0 && lua_istable(L, -1)) {
      enc_byte(e, T_GLOBALS);            /* any environment: the receiver's */
      lua_pop(L, 1);
      continue;
    }
    s.i = (lua_Integer)i;
    enc_value(e, lua_gettop(L));
    lua_pop(L, 1);
  }
  e->infunc--;
  seg_pop(e, &s);
  e->depth--;
}

static void enc_userdata(enc *e, int idx) {
  lua_State *L = e->L;
  uint32_t id = phash_get(&e->seen, lua_topointer(L, idx));
  char what[128];
  if (id) { enc_ref(e, id); return; }
  if (lua_getmetatable(L, idx)) {
    int mt = lua_gettop(L);
    if (lua_getfield(L, mt, "__mp_reduce") != LUA_TNIL) {
      lua_remove(L, mt);
      enc_handle(e, idx);
      return;
    }
    lua_pop(L, 1);
    snprintf(what, sizeof what, "userdata (%.80s)", push_mtname(L, mt));
  } else {
    snprintf(what, sizeof what, "userdata");
  }
  enc_fail(e, what);
}

static void enc_typed(enc *e, int idx, int type) {
  lua_State *L = e->L;
  switch (type) {
  case LUA_TNIL: enc_byte(e, T_NIL); break;
  case LUA_TBOOLEAN: enc_byte(e, lua_toboolean(L, idx) ? T_TRUE : T_FALSE);
    break;
  case LUA_TNUMBER:
    if (lua_isinteger(L, idx)) enc_int(e, lua_tointeger(L, idx));
    else enc_float(e, lua_tonumber(L, idx));
    break;
  case LUA_TSTRING: {
    size_t n;
    const char *s = lua_tolstring(L, idx, &n);
    enc_str(e, s, n);
    break;
  }
  case LUA_TTABLE: enc_table(e, idx); break;
  case LUA_TFUNCTION: enc_function(e, idx); break;
  case LUA_TUSERDATA: enc_userdata(e, idx); break;
  case LUA_TLIGHTUSERDATA: enc_fail(e, "light userdata"); break;
  default: enc_fail(e, lua_typename(L, type)); break;
  }
}

static void enc_value(enc *e, int idx) {
  enc_typed(e, idx, lua_type(e->L, idx));
}

MP_API void mp_encode_named(lua_State *L, int idx, mp_buf *b, mp_fdlist *fds,
                            const char *root) {
  enc e;
  int top;
  size_t hdr;
  idx = lua_absindex(L, idx);
  luaL_checkstack(L, 16, NULL);
  top = lua_gettop(L);
  e.L = L;
  e.b = b;
  e.fds = fds;
  e.root = root ? root : "value";
  e.path = NULL;
  e.depth = 0;
  e.modchecked = 0;
  e.infunc = 0;
  e.nref = e.nuv = 0;
  lua_pushnil(L);
  phash_init(&e.seen, top + 1);
  lua_pushnil(L);
  phash_init(&e.uvs, top + 2);
  push_env(L);
  e.env = top + 3;
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  e.globals = top + 4;
  lua_rawgeti(L, e.env, E_BYVAL);
  e.byval = top + 5;
  lua_pushnil(L);
  e.modof = top + 6;
  lua_pushnil(L);
  e.keyof = top + 7;
  e.flags = 0;
  hdr = b->len;
  enc_byte(&e, CODEC_VERSION);
  enc_byte(&e, 0);                       /* flags, patched below */
  enc_value(&e, idx);
  b->data[hdr + 1] = (char)e.flags;
  lua_settop(L, top);
}

MP_API void mp_encode(lua_State *L, int idx, mp_buf *b, mp_fdlist *fds) {
  mp_encode_named(L, idx, b, fds, NULL);
}

/* ---- decoder ----------------------------------------------------------- */

/* The fds that came with a message, closed at the end unless a handle
   took them (a to-be-closed userdata, so a raise closes them too). */
typedef struct fdbox {
  mp_fdlist l;
  unsigned char taken[MP_MAX_FDS];
} fdbox;

static int fdbox_close(lua_State *L) {
  fdbox *fb = (fdbox *)luaL_checkudata(L, 1, MP_CODEC_FDS_T);
  int i;
  for (i = 0; i < fb->l.n; i++)
    if (!fb->taken[i] && fb->l.fd[i] >= 0) close(fb->l.fd[i]);
  fb->l.n = 0;
  return 0;
}

typedef struct dec {
  lua_State *L;
  const unsigned char *p, *end, *start;
  int flags, depth;
  size_t budget;
  int refs, uvs, env;                    /* stack slots */
  int hasrefs;                           /* F_REFS: keep the ids */
  uint32_t nref, nuv;
  fdbox *fb;
} dec;

static void dec_value(dec *d);

static int dec_fail(dec *d, const char *what) {
  return mp_raise(d->L, "SerializationError",
                  "cannot decode message: %s (at byte %d)", what,
                  (int)(d->p - d->start));
}

static void need(dec *d, size_t n) {
  if ((size_t)(d->end - d->p) < n) dec_fail(d, "truncated");
}

static uint64_t rd_varint(dec *d) {
  uint64_t v = 0;
  int shift = 0;
  for (;;) {
    unsigned c;
    if (d->p >= d->end) dec_fail(d, "truncated");
    c = *d->p++;
    if (shift == 63 && c > 1) dec_fail(d, "integer out of range");
    v |= (uint64_t)(c & 0x7f) << shift;
    if (!(c & 0x80)) return v;
    shift += 7;
    if (shift > 63) dec_fail(d, "integer out of range");
  }
}

static uint32_t rd_u32(dec *d) {
  const unsigned char *p;
  need(d, 4);
  p = d->p;
  d->p += 4;
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
         (uint32_t)p[3] << 24;
}

/* A string field (name, kind): STR or short string. */
static const char *rd_name(dec *d, size_t *n) {
  const char *s;
  unsigned tag;
  need(d, 1);
  tag = *d->p++;
  if (tag >= T_SHORTSTR && tag <= T_SHORTSTR + SHORTSTR_MAX) {
    *n = tag - T_SHORTSTR;
  } else if (tag == T_STR) {
    uint64_t len = rd_varint(d);
    if (len > (uint64_t)(d->end - d->p)) dec_fail(d, "truncated");
    *n = (size_t)len;
  } else {
    d->p--;
    dec_fail(d, "a name was expected");
  }
  need(d, *n);
  s = (const char *)d->p;
  d->p += *n;
  if (memchr(s, '\0', *n) != NULL) dec_fail(d, "bad name");
  return s;
}

static void add_ref(dec *d, int idx) {
  lua_State *L = d->L;
  if (!d->hasrefs) return;               /* nothing will refer to it */
  if (lua_isnil(L, d->refs)) {
    lua_newtable(L);
    lua_replace(L, d->refs);
  }
  lua_pushvalue(L, idx);
  lua_rawseti(L, d->refs, ++d->nref);
}

static void dec_enter(dec *d) {
  if (++d->depth > MAXDEPTH) dec_fail(d, "nested too deep");
  luaL_checkstack(d->L, 8, "nesting");
}

/* Are the next narr values all scalars (no table, function, handle or
   reference inside, so no id is taken among them)? */
static int scalars_only(const dec *d, uint64_t narr) {
  const unsigned char *p = d->p, *end = d->end;
  uint64_t i;
  for (i = 0; i < narr; i++) {
    unsigned c;
    if (p >= end) return 0;
    c = *p;
    if (c >= T_FIXINT || c <= T_TRUE) p++;
    else if (c == T_FLOAT) p += 9;
    else if (c >= T_SHORTSTR && c <= T_SHORTSTR + SHORTSTR_MAX)
      p += 1 + (c - T_SHORTSTR);
    else if (c == T_INT) {
      p++;
      while (p < end && (*p & 0x80)) p++;
      p++;
    } else return 0;
  }
  return p <= end;
}

/* Push the next array value, with fast paths for numbers. */
static void dec_item(dec *d) {
  const unsigned char *p = d->p;
  if (p < d->end && *p >= T_FIXINT) {
    lua_pushinteger(d->L, *p - T_FIXINT);
    d->p++;
  } else if (p + 9 <= d->end && *p == T_FLOAT) {
    uint64_t u;
    double x;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    memcpy(&u, p + 1, 8);
#else
    int j;
    for (u = 0, j = 0; j < 8; j++) u |= (uint64_t)p[1 + j] << (8 * j);
#endif
    memcpy(&x, &u, 8);
    lua_pushnumber(d->L, (lua_Number)x);
    d->p += 9;
  } else {
    dec_value(d);
  }
}

/* Read a registered name and push what mp.register gave it, which must be
   of type t; what (class, function) names it in the error. */
static void push_registered(dec *d, int t, const char *what) {
  lua_State *L = d->L;
  size_t n;
  const char *name = rd_name(d, &n);
  lua_rawgeti(L, d->env, E_BYNAME);
  lua_pushlstring(L, name, n);
  if (lua_rawget(L, -2) != t) {
    char msg[120];
    lua_pushlstring(L, name, n);
    snprintf(msg, sizeof msg, "%s '%.60s' is not registered in this process",
             what, lua_tostring(L, -1));
    dec_fail(d, msg);
  }
  lua_remove(L, -2);
}

/* The table at t gets the metatable just below it, which leaves the
   stack; returns the table's new index. */
static int take_mt(lua_State *L, int t) {
  lua_pushvalue(L, t - 1);
  lua_setmetatable(L, t);
  lua_remove(L, t - 1);
  return t - 1;
}

static void dec_table(dec *d, int withmt) {
  lua_State *L = d->L;
  uint64_t narr, nh, i, left;
  int t;
  dec_enter(d);
  if (withmt) {
    push_registered(d, LUA_TTABLE, "class");   /* mt */
  }
  narr = rd_u32(d);
  nh = rd_u32(d);
  left = (uint64_t)(d->end - d->p);
  if (narr > left || nh > left / 2 || narr + 2 * nh > d->budget ||
      narr > INT_MAX || nh > INT_MAX)
    dec_fail(d, "table larger than the message");
  d->budget -= (size_t)(narr + 2 * nh);
  if (nh == 0 && narr >= 16 && narr <= 100000 && scalars_only(d, narr) &&
      lua_checkstack(L, (int)narr + 8)) {
    /* a list of scalars: pushed, then made a table by Lua's own {...}
       (one API call per item instead of two); no id is taken inside it,
       so registering the table after its items keeps the ids in order */
    lua_rawgeti(L, d->env, E_PACK);
    for (i = 1; i <= narr; i++) dec_item(d);
    lua_call(L, (int)narr, 1);
    t = lua_gettop(L);
    if (withmt) t = take_mt(L, t);
    add_ref(d, t);
    d->depth--;
    return;
  }
  lua_createtable(L, (int)narr, (int)nh);
  t = lua_gettop(L);
  if (withmt) t = take_mt(L, t);
  add_ref(d, t);
  for (i = 1; i <= narr; i++) {
    dec_item(d);
    lua_rawseti(L, t, (lua_Integer)i);
  }
  for (i = 0; i < nh; i++) {
    /* only these tags can give a nil or NaN key: every other value is
       neither (a rebuilt handle is checked not nil, a module too) */
    unsigned ktag;
    need(d, 1);
    ktag = *d->p;
    if (ktag == T_NIL) dec_fail(d, "nil table key");
    dec_value(d);
    if (ktag == T_FLOAT) {
      lua_Number k = lua_tonumber(L, -1);
      if (k != k) dec_fail(d, "NaN table key");
    }
    dec_value(d);
    lua_rawset(L, t);
  }
  d->depth--;
}

/* package.loaded[name], required when allowed; pushes it or raises. */
static void dec_module(dec *d, const char *name, size_t n) {
  lua_State *L = d->L;
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  if (!lua_istable(L, -1)) dec_fail(d, "no package.loaded");
  lua_pushlstring(L, name, n);
  if (lua_rawget(L, -2) == LUA_TNIL && !(d->flags & MP_DECODE_NOFUNCS)) {
    lua_pop(L, 1);
    lua_getglobal(L, "require");
    lua_pushlstring(L, name, n);
    if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
      char what[300];
      lua_pushlstring(L, name, n);
      snprintf(what, sizeof what, "module '%.60s' cannot be loaded: %.200s",
               lua_tostring(L, -1),
               lua_isstring(L, -2) ? lua_tostring(L, -2) : "?");
      dec_fail(d, what);
    }
  }
  if (!lua_istable(L, -1)) {              /* only tables travel as modules */
    char what[120];
    lua_pushlstring(L, name, n);
    snprintf(what, sizeof what, "module '%.60s' is not loaded",
             lua_tostring(L, -1));
    dec_fail(d, what);
  }
  lua_remove(L, -2);
}

static void nofuncs(dec *d) {
  if (d->flags & MP_DECODE_NOFUNCS)
    dec_fail(d, "functions are refused here (functions=false)");
}

typedef struct rdr { const char *p; size_t n; } rdr;

static const char *load_reader(lua_State *L, void *ud, size_t *n) {
  rdr *r = (rdr *)ud;
  (void)L;
  *n = r->n;
  r->n = 0;
  return *n ? r->p : NULL;
}

static void dec_luafunc(dec *d) {
  lua_State *L = d->L;
  uint32_t len, i;
  uint64_t nups;
  int f;
  rdr r;
  nofuncs(d);
  dec_enter(d);
  len = rd_u32(d);
  need(d, len);
  r.p = (const char *)d->p;
  r.n = len;
  if (len < 4 || memcmp(r.p, LUA_SIGNATURE, 4) != 0)
    dec_fail(d, "not a Lua function");
  if (lua_load(L, load_reader, &r, "=(mp.loads)", "b") != LUA_OK) {
    char what[200];
    snprintf(what, sizeof what, "bad function: %.150s", lua_tostring(L, -1));
    dec_fail(d, what);
  }
  d->p += len;
  f = lua_gettop(L);
  add_ref(d, f);
  nups = rd_varint(d);
  if (nups > 255 || (nups > 0 && lua_getupvalue(L, f, (int)nups) == NULL))
    dec_fail(d, "bad upvalue count");
  if (nups > 0) lua_pop(L, 1);
  if (lua_getupvalue(L, f, (int)nups + 1) != NULL)
    dec_fail(d, "bad upvalue count");
  for (i = 1; i <= nups; i++) {
    int kind;
    need(d, 1);
    kind = *d->p++;
    if (kind == 0) {                     /* a new upvalue */
      if (lua_isnil(L, d->uvs)) {
        lua_newtable(L);
        lua_replace(L, d->uvs);
      }
      d->nuv++;
      lua_pushvalue(L, f);
      lua_rawseti(L, d->uvs, 2 * (lua_Integer)d->nuv - 1);
      lua_pushinteger(L, i);
      lua_rawseti(L, d->uvs, 2 * (lua_Integer)d->nuv);
      dec_value(d);
      lua_setupvalue(L, f, (int)i);
    } else if (kind == 1) {              /* shared with an earlier one */
      uint64_t k = rd_varint(d);
      int n;
      if (k < 1 || k > d->nuv) dec_fail(d, "bad upvalue reference");
      lua_rawgeti(L, d->uvs, 2 * (lua_Integer)k);
      n = (int)lua_tointeger(L, -1);
      lua_pop(L, 1);
      lua_rawgeti(L, d->uvs, 2 * (lua_Integer)k - 1);
      if (lua_iscfunction(L, -1)) dec_fail(d, "bad upvalue reference");
      lua_upvaluejoin(L, f, (int)i, -1, n);
      lua_pop(L, 1);
    } else {
      d->p--;
      dec_fail(d, "bad upvalue");
    }
  }
  d->depth--;
}

static void dec_handle(dec *d) {
  lua_State *L = d->L;
  size_t n;
  const char *kind = rd_name(d, &n);
  uint64_t nfds, j;
  int pos[MP_MAX_FDS], fd[MP_MAX_FDS], have = d->fb ? d->fb->l.n : 0;
  if (d->flags & MP_DECODE_NOHANDLES) {  /* its fds are closed by the raise */
    char what[160];
    lua_pushlstring(L, kind, n);
    snprintf(what, sizeof what, "handles (%.60s) are refused from a peer that "
             "proved no authkey", lua_tostring(L, -1));
    dec_fail(d, what);
  }
  nfds = rd_varint(d);
  if (nfds > MP_MAX_FDS) dec_fail(d, "too many fds");
  for (j = 0; j < nfds; j++) {
    uint64_t k = rd_varint(d);
    if (k >= (uint64_t)have) {
      char what[120];
      snprintf(what, sizeof what, "a handle needs fd #%d but %d came with "
               "the message", (int)(k > 999 ? 999 : k) + 1, have);
      dec_fail(d, what);
    }
    pos[j] = (int)k;
  }
  luaL_checkstack(L, (int)nfds + 8, NULL);
  lua_rawgeti(L, d->env, E_KINDS);
  lua_pushlstring(L, kind, n);
  if (lua_rawget(L, -2) != LUA_TFUNCTION) {
    char what[120];
    lua_pushlstring(L, kind, n);
    snprintf(what, sizeof what, "unknown handle kind '%.60s'",
             lua_tostring(L, -1));
    dec_fail(d, what);
  }
  lua_remove(L, -2);                     /* rebuild */
  dec_enter(d);
  dec_value(d);                          /* rebuild, state */
  d->depth--;
  for (j = 0; j < nfds; j++) {          /* a second user of an fd gets a */
    int i = pos[j], k;                   /* copy; all copies or none */
    fd[j] = d->fb->l.fd[i];
    for (k = 0; k < (int)j && pos[k] != i; k++) {}
    if (d->fb->taken[i] || k < (int)j) {
      fd[j] = fcntl(fd[j], F_DUPFD_CLOEXEC, 0);
      if (fd[j] < 0) {
        char what[120];
        snprintf(what, sizeof what, "cannot duplicate fd: %s",
                 strerror(errno));
        while (j-- > 0)
          if (fd[j] != d->fb->l.fd[pos[j]]) close(fd[j]);
        dec_fail(d, what);
      }
    }
  }
  for (j = 0; j < nfds; j++) {
    d->fb->taken[pos[j]] = 1;            /* rebuild owns them from now on */
    lua_pushinteger(L, fd[j]);
  }
  lua_call(L, 1 + (int)nfds, 1);
  if (lua_isnil(L, -1)) {
    char what[120];
    lua_pushlstring(L, kind, n);
    snprintf(what, sizeof what, "the rebuild of handle kind '%.60s' "
             "returned nil", lua_tostring(L, -1));
    dec_fail(d, what);
  }
  add_ref(d, lua_gettop(L));
}

static void dec_value(dec *d) {
  lua_State *L = d->L;
  unsigned tag;
  need(d, 1);
  tag = *d->p++;
  if (tag >= T_FIXINT) {
    lua_pushinteger(L, (lua_Integer)(tag - T_FIXINT));
    return;
  }
  if (tag >= T_SHORTSTR && tag <= T_SHORTSTR + SHORTSTR_MAX) {
    size_t n = tag - T_SHORTSTR;
    need(d, n);
    lua_pushlstring(L, (const char *)d->p, n);
    d->p += n;
    return;
  }
  switch (tag) {
  case T_NIL: lua_pushnil(L); return;
  case T_FALSE: lua_pushboolean(L, 0); return;
  case T_TRUE: lua_pushboolean(L, 1); return;
  case T_INT: {
    uint64_t z = rd_varint(d);
    lua_pushinteger(L, (lua_Integer)((z >> 1) ^ (~(z & 1) + 1)));
    return;
  }
  case T_FLOAT: {
    uint64_t u;
    double x;
    need(d, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    memcpy(&u, d->p, 8);
#else
    { int j; for (u = 0, j = 0; j < 8; j++) u |= (uint64_t)d->p[j] << (8 * j); }
#endif
    memcpy(&x, &u, 8);
    d->p += 8;
    lua_pushnumber(L, (lua_Number)x);
    return;
  }
  case T_STR: {
    uint64_t n = rd_varint(d);
    if (n > (uint64_t)(d->end - d->p)) dec_fail(d, "truncated");
    lua_pushlstring(L, (const char *)d->p, (size_t)n);
    d->p += n;
    return;
  }
  case T_TABLE: dec_table(d, 0); return;
  case T_TABLE_MT: dec_table(d, 1); return;
  case T_REF: {
    uint64_t id = rd_varint(d);
    if (id < 1 || id > d->nref || !d->hasrefs) dec_fail(d, "bad reference");
    lua_rawgeti(L, d->refs, (lua_Integer)id);
    return;
  }
  case T_GLOBALS:
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
    return;
  case T_MODULE: {
    size_t n;
    const char *name = rd_name(d, &n);
    dec_module(d, name, n);
    return;
  }
  case T_FN_REG: {
    nofuncs(d);
    push_registered(d, LUA_TFUNCTION, "function");
    return;
  }
  case T_FN_MOD: {
    size_t nm, nk;
    const char *mod, *key;
    nofuncs(d);
    mod = rd_name(d, &nm);
    key = rd_name(d, &nk);
    dec_module(d, mod, nm);
    lua_pushlstring(L, key, nk);
    if (!lua_istable(L, -2) || lua_rawget(L, -2) != LUA_TFUNCTION) {
      char what[160];
      lua_pushlstring(L, mod, nm);
      lua_pushlstring(L, key, nk);
      snprintf(what, sizeof what, "function '%.60s.%.60s' not found in this "
               "process", lua_tostring(L, -2), lua_tostring(L, -1));
      dec_fail(d, what);
    }
    lua_remove(L, -2);
    return;
  }
  case T_FN_LUA: dec_luafunc(d); return;
  case T_HANDLE: dec_handle(d); return;
  default:
    d->p--;
    dec_fail(d, "unknown tag");
  }
}

MP_API void mp_decode(lua_State *L, const char *p, size_t len,
                      mp_fdlist *fds, int flags) {
  dec d;
  int base;
  luaL_checkstack(L, 16, NULL);
  base = lua_gettop(L);
  d.L = L;
  d.fb = NULL;
  lua_pushnil(L);                        /* base+1: the result */
  if (fds && fds->n > 0) {               /* base+2: the fds, to-be-closed */
    fdbox *fb = (fdbox *)lua_newuserdatauv(L, sizeof(fdbox), 0);
    fb->l.n = 0;
    luaL_setmetatable(L, MP_CODEC_FDS_T);
    lua_toclose(L, -1);
    fb->l = *fds;
    if (fb->l.n > MP_MAX_FDS) fb->l.n = MP_MAX_FDS;
    memset(fb->taken, 0, sizeof fb->taken);
    fds->n = 0;
    d.fb = fb;
  } else {
    lua_pushnil(L);
  }
  lua_pushnil(L);
  d.refs = base + 3;
  lua_pushnil(L);
  d.uvs = base + 4;
  push_env(L);
  d.env = base + 5;
  d.start = d.p = (const unsigned char *)p;
  d.end = d.p + len;
  d.flags = flags;
  d.depth = 0;
  d.budget = len;
  d.nref = d.nuv = 0;
  if (len < 1) dec_fail(&d, "empty message");
  if (*d.p != CODEC_VERSION) {
    char what[100];
    snprintf(what, sizeof what, "format version %d, this process reads "
             "version %d", *d.p, CODEC_VERSION);
    dec_fail(&d, what);
  }
  d.p++;
  need(&d, 1);
  if (*d.p & ~F_REFS) dec_fail(&d, "unknown header flags");
  d.hasrefs = *d.p & F_REFS;
  d.p++;
  dec_value(&d);
  if (d.p != d.end) dec_fail(&d, "trailing bytes after the value");
  lua_replace(L, base + 1);
  lua_settop(L, base + 1);               /* closes the fds no handle took */
}

/* ---- Lua API ----------------------------------------------------------- */

/* mp.dumps(v [, name]) -> string [, fds]: name is the root of error paths */
static int codec_dumps(lua_State *L) {
  mp_fdlist fds;
  mp_buf *b;
  const char *root = luaL_optstring(L, 2, NULL);
  luaL_checkany(L, 1);
  fds.n = 0;
  lua_settop(L, 2);
  push_env(L);                           /* 3 */
  /* reuse the spare buffer (taken out while in use: a nested dumps from a
     __mp_reduce gets its own); a raise just leaves it to the GC */
  if (lua_rawgeti(L, 3, E_BUF) == LUA_TUSERDATA) {
    b = (mp_buf *)lua_touserdata(L, 4);
    b->len = 0;
    lua_pushnil(L);
    lua_rawseti(L, 3, E_BUF);
  } else {
    lua_pop(L, 1);
    b = mp_buf_push(L, 0);
  }
  mp_encode_named(L, 1, b, &fds, root);
  lua_pushlstring(L, b->data, b->len);
  if (b->cap <= 1 << 20) {               /* keep it unless it got big */
    lua_pushvalue(L, 4);
    lua_rawseti(L, 3, E_BUF);
  }
  if (fds.n > 0) {
    int i;
    lua_createtable(L, fds.n, 0);
    for (i = 0; i < fds.n; i++) {
      lua_pushinteger(L, fds.fd[i]);
      lua_rawseti(L, -2, i + 1);
    }
    return 2;
  }
  return 1;
}

/* mp.loads(s [, {functions=bool, fds={fd...}}]) -> v; the fds are
   duplicated (the caller keeps its own). */
static int codec_loads(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  int flags = 0, i, nfds = 0;
  mp_fdlist fl;
  fl.n = 0;
  if (!lua_isnoneornil(L, 2)) {
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_pushnil(L);
    while (lua_next(L, 2)) {
      const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "";
      if (strcmp(k, "functions") != 0 && strcmp(k, "fds") != 0) {
        lua_pop(L, 1);
        return luaL_argerror(L, 2, lua_pushfstring(L, "unknown option '%s'",
                             luaL_tolstring(L, -1, NULL)));
      }
      lua_pop(L, 1);
    }
    if (lua_getfield(L, 2, "functions") != LUA_TNIL) {
      luaL_argcheck(L, lua_isboolean(L, -1), 2,
                    "option 'functions' must be a boolean");
      if (!lua_toboolean(L, -1)) flags |= MP_DECODE_NOFUNCS;
    }
    lua_pop(L, 1);
    if (lua_getfield(L, 2, "fds") != LUA_TNIL) {
      int t = lua_gettop(L);
      luaL_argcheck(L, lua_istable(L, t), 2, "option 'fds' must be a list");
      nfds = (int)luaL_len(L, t);
      luaL_argcheck(L, nfds >= 0 && nfds <= MP_MAX_FDS, 2,
                    "option 'fds': too many fds");
      for (i = 0; i < nfds; i++) {
        int isnum;
        lua_Integer fd;
        lua_rawgeti(L, t, i + 1);
        fd = lua_tointegerx(L, -1, &isnum);
        luaL_argcheck(L, isnum && fd >= 0 && fd <= INT_MAX, 2,
                      "option 'fds' must hold fd numbers");
        fl.fd[i] = (int)fd;
        lua_pop(L, 1);
      }
    }
    lua_pop(L, 1);
  }
  for (i = 0; i < nfds; i++) {
    int fd = fcntl(fl.fd[i], F_DUPFD_CLOEXEC, 0);
    if (fd < 0) {
      int err = errno;
      mp_fdlist_close(&fl);
      return luaL_error(L, "loads: cannot duplicate fd %d: %s", fl.fd[i],
                        strerror(err));
    }
    fl.fd[i] = fd;
    fl.n = i + 1;
  }
  lua_settop(L, 1);
  mp_decode(L, s, n, &fl, flags);
  return 1;
}

/* mp.register(name, class_or_function) -> class_or_function */
static int codec_register(lua_State *L) {
  size_t n;
  const char *name = luaL_checklstring(L, 1, &n);
  int t = lua_type(L, 2);
  luaL_argcheck(L, n > 0, 1, "name must not be empty");
  luaL_argexpected(L, t == LUA_TTABLE || t == LUA_TFUNCTION, 2,
                   "table (a metatable) or function");
  lua_settop(L, 2);
  push_env(L);                           /* name, v, env */
  lua_rawgeti(L, 3, E_BYNAME);           /* 4 */
  lua_rawgeti(L, 3, E_BYVAL);            /* 5 */
  lua_pushvalue(L, 1);
  if (lua_rawget(L, 4) != LUA_TNIL) {
    if (lua_rawequal(L, -1, 2)) {
      lua_settop(L, 2);
      return 1;
    }
    return luaL_error(L, "register: name '%s' is already registered with "
                      "another value", name);
  }
  lua_pop(L, 1);
  lua_pushvalue(L, 2);
  if (lua_rawget(L, 5) == LUA_TSTRING)
    return luaL_error(L, "register: this %s is already registered as '%s'",
                      luaL_typename(L, 2), lua_tostring(L, -1));
  lua_pop(L, 1);
  lua_pushvalue(L, 1);
  lua_pushvalue(L, 2);
  lua_rawset(L, 4);
  lua_pushvalue(L, 2);
  lua_pushvalue(L, 1);
  lua_rawset(L, 5);
  lua_settop(L, 2);
  return 1;
}

/* Register the function on the stack's top (popped) as the rebuild of
   handle kind `kind`: rebuild(state, fd...) -> object. The C files' openers
   register their kinds with it (the codec opens first); a later
   registration of the same kind replaces the earlier one. */
MP_API void mp_register_handle(lua_State *L, const char *kind) {
  push_env(L);                           /* rebuild, env */
  lua_rawgeti(L, -1, E_KINDS);           /* rebuild, env, kinds */
  lua_pushstring(L, kind);
  lua_pushvalue(L, -4);                  /* rebuild, env, kinds, kind, rebuild */
  lua_rawset(L, -3);
  lua_pop(L, 3);
}

/* core.register_handle(kind, rebuild): the same, for kinds made in Lua
   (manager proxies) */
static int codec_register_handle(lua_State *L) {
  const char *kind = luaL_checkstring(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_settop(L, 2);
  mp_register_handle(L, kind);
  return 0;
}

MP_API void mp_codec_open(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"dumps", codec_dumps},
    {"loads", codec_loads},
    {"register", codec_register},
    {"register_handle", codec_register_handle},
    {NULL, NULL}
  };
  static const luaL_Reg fds_meta[] = {
    {"__gc", fdbox_close}, {"__close", fdbox_close}, {NULL, NULL}
  };
  mp_newclass(L, MP_CODEC_FDS_T, NULL, fds_meta, NULL, NULL);
  lua_pop(L, 1);
  push_env(L);
  lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
  lua_pushinteger(L, CODEC_VERSION);
  lua_setfield(L, -2, "CODEC_VERSION");
  lua_pushinteger(L, MAXDEPTH);
  lua_setfield(L, -2, "CODEC_MAXDEPTH");
}
