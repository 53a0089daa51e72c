/*
 * host.c: a C program that embeds Lua 5.4 and multiprocessing, and has a
 * C function of its own, host.add(a, b), that spawned children can call
 * because they are this program too (mp.set_executable names it and
 * mp_child_main runs them).
 *
 *   make embed && examples/embed/host [script.lua]
 *
 * Runs examples/embed/script.lua by default; see that file for its output.
 */
#define _GNU_SOURCE
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "lua.h"
#include "lauxlib.h"
#include "lualib.h"
#include "multiprocessing.h"

/* host.add(a, b) -> a + b */
static int host_add(lua_State *L) {
  lua_Number a = luaL_checknumber(L, 1), b = luaL_checknumber(L, 2);
  lua_pushnumber(L, a + b);
  return 1;
}

/* Every state of this program, the main one and the spawned children's:
   the standard libraries, the C core preloaded, the host's functions. */
static lua_State *new_state(void) {
  static const luaL_Reg host_funcs[] = {{"add", host_add}, {NULL, NULL}};
  lua_State *L = luaL_newstate();
  if (L == NULL) return NULL;
  luaL_openlibs(L);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushcfunction(L, luaopen_multiprocessing_core);
  lua_setfield(L, -2, "multiprocessing.core");
  lua_pushcfunction(L, luaopen_multiprocessing_auth);
  lua_setfield(L, -2, "multiprocessing.auth");
  lua_pop(L, 1);
  luaL_newlib(L, host_funcs);
  lua_setglobal(L, "host");
  return L;
}

int main(int argc, char **argv) {
  const char *script = argc > 1 ? argv[1] : "examples/embed/script.lua";
  char exe[PATH_MAX];
  ssize_t n;
  lua_State *L;
  int code = mp_child_main(argc, argv, new_state);
  if (code >= 0) return code;          /* this process was a spawned child */

  L = new_state();
  if (L == NULL) return 1;
  /* arg[0] names the entry chunk that spawned children re-run */
  lua_createtable(L, 0, 1);
  lua_pushstring(L, script);
  lua_rawseti(L, -2, 0);
  lua_setglobal(L, "arg");
  /* spawned children run this program: mp.set_executable(its path) */
  n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (n <= 0) {
    fprintf(stderr, "host: cannot find its own executable\n");
    return 1;
  }
  exe[n] = '\0';
  lua_getglobal(L, "require");
  lua_pushliteral(L, "multiprocessing");
  if (lua_pcall(L, 1, 1, 0) != LUA_OK) goto fail;
  lua_getfield(L, -1, "set_executable");
  lua_pushstring(L, exe);
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) goto fail;
  lua_pop(L, 1);
  if (luaL_dofile(L, script) != LUA_OK) goto fail;
  lua_close(L);                        /* joins what is left to join */
  return 0;
fail:
  fprintf(stderr, "host: %s\n", luaL_tolstring(L, -1, NULL));
  lua_close(L);
  return 1;
}
