/*
 * codec.c: the one codec (docs/design.md, decision 3): any Lua value to a
 * message and back, for mp.dumps/mp.loads and every transport. This file
 * is its Lua side: mp.dumps, mp.loads, mp.register, the registry of
 * handle kinds (mp_register_handle, core.register_handle; decision 1:
 * handles), the codec's tables (the env, codec_impl.h) and the opener.
 * The work is done by codec_enc.c (mp_encode) and codec_dec.c
 * (mp_decode); the format is codec.h's, a scalar's bytes codec_scalar.h's.
 */
#include "codec_impl.h"

#include <limits.h>
#include <string.h>

/* The env, in the registry under &mp_codec_envkey. */
MP_API const char mp_codec_envkey = 'C';

MP_API void mp_codec_env_new(lua_State *L) {
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
  lua_rawsetp(L, LUA_REGISTRYINDEX, &mp_codec_envkey);
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
  mp_codec_env(L);                           /* 3 */
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
  int flags = 0, i, err;
  mp_fdlist given, fl;              /* the caller's fds, our copies */
  given.n = fl.n = 0;
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
      int t = lua_gettop(L), nfds;
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
        given.fd[given.n++] = (int)fd;
        lua_pop(L, 1);
      }
    }
    lua_pop(L, 1);
  }
  if (given.n > 0 && (err = mp_fdlist_dup(&given, &fl)) != 0)
    return mp_raise_errno(L, err, "loads: cannot duplicate the fds");
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
  mp_codec_env(L);                           /* name, v, env */
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
  mp_codec_env(L);                           /* rebuild, env */
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

/* core._test.handle_kinds() -> the registered handle kinds, sorted (the
   fuzz harness replaces each one's rebuild) */
static int codec_test_handle_kinds(lua_State *L) {
  int n = 0;
  lua_newtable(L);                       /* list */
  mp_codec_env(L);
  lua_rawgeti(L, -1, E_KINDS);           /* list, env, kinds */
  lua_pushnil(L);
  while (lua_next(L, -2)) {              /* list, env, kinds, kind, rebuild */
    lua_pop(L, 1);
    lua_pushvalue(L, -1);
    lua_rawseti(L, -5, ++n);
  }
  lua_pop(L, 2);
  lua_getglobal(L, "table");
  if (lua_getfield(L, -1, "sort") == LUA_TFUNCTION) {
    lua_pushvalue(L, -3);
    lua_call(L, 1, 0);
  } else {
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return 1;
}

MP_API void mp_codec_open(lua_State *L) {
  static const luaL_Reg tests[] = {
    {"handle_kinds", codec_test_handle_kinds}, {NULL, NULL}
  };
  static const luaL_Reg funcs[] = {
    {"dumps", codec_dumps},
    {"loads", codec_loads},
    {"register", codec_register},
    {"register_handle", codec_register_handle},
    {NULL, NULL}
  };
  static const luaL_Reg fds_meta[] = {
    {"__gc", mp_codec_fds_close}, {"__close", mp_codec_fds_close}, {NULL, NULL}
  };
  mp_newclass(L, MP_CODEC_FDS_T, NULL, fds_meta, NULL, NULL);
  lua_pop(L, 1);
  mp_codec_env(L);
  lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
  lua_pushinteger(L, CODEC_VERSION);
  lua_setfield(L, -2, "CODEC_VERSION");
  lua_pushinteger(L, MAXDEPTH);
  lua_setfield(L, -2, "CODEC_MAXDEPTH");
  mp_add_tests(L, tests);
}
