/*
 * codec_dec.c: the codec's decoder (docs/design.md, decision 3: one
 * codec, and trust decides what it decodes): mp_decode turns a message in
 * codec.h's format back into a Lua value, for mp.loads (codec.c) and
 * every transport. Scalars' payloads are read by codec_scalar.h's
 * helpers, under this file's bounds checks and messages.
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
 * A handle is rebuilt by its kind's registered function (decision 1:
 * handles), which owns the fds it is given; the fds that came with the
 * message and no handle took are closed, on a raise too.
 */
#include "codec_impl.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* The fds that came with a message, closed at the end unless a handle
   took them (a to-be-closed userdata, so a raise closes them too). */
typedef struct fdbox {
  mp_fdlist l;
  unsigned char taken[MP_MAX_FDS];
} fdbox;

MP_API int mp_codec_fds_close(lua_State *L) {
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

/* A varint (codec_scalar.h's reader). cs_get_varint refuses one cut
   short, or (only at its tenth byte) one longer than 64 bits: fewer than
   ten bytes left means cut. */
static uint64_t rd_varint(dec *d) {
  uint64_t v;
  if (cs_get_varint(&d->p, d->end, &v)) return v;
  if (d->end - d->p < 10) {
    d->p = d->end;
    dec_fail(d, "truncated");
  }
  d->p += 10;
  dec_fail(d, "integer out of range");
  return 0;
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
  } else if (d->end - p >= 9 && *p == T_FLOAT) {
    lua_pushnumber(d->L, cs_get_f64(p + 1));
    d->p += 9;
  } else {
    dec_value(d);
  }
}

/* Push the entry of the name[0, n) in the codec's table e (E_BYNAME,
   E_KINDS), which must be of type t; else fail with fmt, which names
   what, then the name ("%s ... '%.60s'"). */
static void push_entry(dec *d, int e, const char *name, size_t n, int t,
                       const char *fmt, const char *what) {
  lua_State *L = d->L;
  lua_rawgeti(L, d->env, e);
  lua_pushlstring(L, name, n);
  if (lua_rawget(L, -2) != t) {
    char msg[120];
    lua_pushlstring(L, name, n);
    snprintf(msg, sizeof msg, fmt, what, lua_tostring(L, -1));
    dec_fail(d, msg);
  }
  lua_remove(L, -2);
}

/* Read a registered name and push what mp.register gave it, which must be
   of type t; what (class, function) names it in the error. */
static void push_registered(dec *d, int t, const char *what) {
  size_t n;
  const char *name = rd_name(d, &n);
  push_entry(d, E_BYNAME, name, n, t, "%s '%.60s' is not registered in this process",
             what);
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
  push_entry(d, E_KINDS, kind, n, LUA_TFUNCTION, "unknown %s '%.60s'",
             "handle kind");             /* rebuild */
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
  /* a rebuild that raises owns its fds still (it closes them); its error
     object, or a signal's interrupt, goes up as it is; any other error
     (a forged state the rebuild refused) says which kind could not be
     rebuilt */
  if (lua_pcall(L, 1 + (int)nfds, 1, 0) != LUA_OK) {
    char what[200];
    if (lua_type(L, -1) != LUA_TSTRING || mp_is_interrupt(L, -1)) lua_error(L);
    lua_pushlstring(L, kind, n);
    snprintf(what, sizeof what, "the rebuild of handle kind '%.60s' failed: %.100s",
             lua_tostring(L, -1), lua_tostring(L, -2));
    dec_fail(d, what);
  }
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
  case T_INT:
    lua_pushinteger(L, cs_unzigzag(rd_varint(d)));
    return;
  case T_FLOAT:
    need(d, 8);
    lua_pushnumber(L, cs_get_f64(d->p));
    d->p += 8;
    return;
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
  case T_TBL_REG:                        /* this process's own, by name */
    push_registered(d, LUA_TTABLE, "table");
    return;
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
  mp_codec_env(L);
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
