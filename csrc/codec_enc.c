/*
 * codec_enc.c: the codec's encoder (docs/design.md, decision 3: one
 * codec): mp_encode turns any Lua value into a message in codec.h's
 * format, its scalars in codec_scalar.h's bytes; mp.dumps (codec.c) and
 * every transport call it.
 *
 * Tables are written with their sizes first (the decoder charges them
 * against the message's length); a table, Lua function or handle met a
 * second time is a reference to its id, so shared values and cycles
 * survive, and the header's F_REFS flag tells the decoder whether to keep
 * ids at all. Functions travel by name when they are registered or fields
 * of a loaded module (the module maps, rebuilt only when package.loaded
 * changed), else as bytecode (cached per closure) and upvalues, shared
 * upvalues as such; module tables and the globals by name; a value whose
 * metatable has __mp_reduce as a handle (decision 1: handles), its fds
 * collected beside the bytes. What cannot travel raises a
 * SerializationError that names its path ("args[2].sock").
 *
 * Encoder state lives on the C stack; the pointer hashes that find shared
 * tables spill into userdata on the Lua stack, so a raise leaks nothing.
 */
#include "codec_impl.h"

#include <limits.h>
#include <stdio.h>
#include <string.h>

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
  e->b->len += 1 + cs_put_varint(w + 1, v);
}

/* The scalars, in codec_scalar.h's bytes. */
static void enc_str(enc *e, const char *s, size_t n) {
  e->b->len += cs_wr_str(wr(e, n + 11), s, n);
}

/* tag, then the string at stack index i */
static void enc_tag_name(enc *e, int tag, int i) {
  size_t n;
  const char *name = lua_tolstring(e->L, i, &n);
  enc_byte(e, tag);
  enc_str(e, name, n);
}

/* A value registered by value (mp.register): tag and its name; 0 if not */
static int enc_registered(enc *e, int idx, int tag) {
  lua_State *L = e->L;
  lua_pushvalue(L, idx);
  if (lua_rawget(L, e->byval) == LUA_TSTRING) enc_tag_name(e, tag, -1);
  else tag = 0;
  lua_pop(L, 1);
  return tag != 0;
}

static void enc_int(enc *e, lua_Integer i) {
  e->b->len += cs_wr_int(wr(e, 11), i);
}

static void enc_float(enc *e, lua_Number x) {
  e->b->len += cs_wr_float(wr(e, 9), x);
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
    size_t k = cs_put_varint(w, (uint64_t)nfds);
    for (j = 0; j < nfds; j++) k += cs_put_varint(w + k, pos[j]);
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

/* A table's or userdata's metatable: pushed, its stack index returned;
   0 when it has none; -1 when it has __mp_reduce: the value was encoded
   as a handle (nothing left pushed). */
static int enc_mt_or_handle(enc *e, int idx) {
  lua_State *L = e->L;
  int mt;
  if (!lua_getmetatable(L, idx)) return 0;
  mt = lua_gettop(L);
  if (lua_getfield(L, mt, "__mp_reduce") != LUA_TNIL) {
    lua_remove(L, mt);
    enc_handle(e, idx);
    return -1;
  }
  lua_pop(L, 1);
  return mt;
}

static void enc_table(enc *e, int idx) {
  lua_State *L = e->L;
  const void *p = lua_topointer(L, idx);
  uint32_t id = phash_get(&e->seen, p);
  int mt;
  if (id) { enc_ref(e, id); return; }
  if (lua_rawequal(L, idx, e->globals)) { enc_byte(e, T_GLOBALS); return; }
  if (module_name(e, idx, 0)) {
    enc_tag_name(e, T_MODULE, -1);
    lua_pop(L, 1);
    return;
  }
  if (enc_registered(e, idx, T_TBL_REG)) return;   /* a class: by name */
  mt = enc_mt_or_handle(e, idx);
  if (mt < 0) return;                    /* a handle */
  if (mt > 0) {
    lua_pushvalue(L, mt);
    if (lua_rawget(L, e->byval) != LUA_TSTRING || lua_isfunction(L, mt)) {
      char what[160];
      snprintf(what, sizeof what, "table with an unregistered metatable "
               "(%.60s; register it with mp.register)", push_mtname(L, mt));
      enc_fail(e, what);
    }
    enter(e);
    enc_tag_name(e, T_TABLE_MT, -1);
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
  if (enc_registered(e, idx, T_FN_REG)) return;
  if (module_name(e, idx, 1)) {          /* mod, key */
    size_t n;
    const char *key = lua_tolstring(L, -1, &n);
    enc_tag_name(e, T_FN_MOD, -2);
    enc_str(e, key, n);
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
    e->b->len += cs_put_varint(w, nups);
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
  int mt;
  if (id) { enc_ref(e, id); return; }
  mt = enc_mt_or_handle(e, idx);
  if (mt < 0) return;                    /* a handle */
  if (mt > 0) {
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
  mp_codec_env(L);
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
