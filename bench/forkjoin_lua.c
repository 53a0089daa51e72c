/* forkjoin_lua.c: the floor for bench/process.lua's fork_start_join with
   the weight a Lua program has: a Lua state with the standard libraries
   and this library loaded (LUA_PATH/LUA_CPATH as make bench sets them),
   then N times: fork a child that _exits at once, waitpid it. With
   "call", the child first calls an empty Lua function (lua_pcall), the
   least a Process does: running any Lua code in a fresh child maps the
   interpreter's text pages again (minor faults) and writes the Lua
   state's pages (copy-on-write faults).
   Prints cycles/s. usage: forkjoin_lua N [call] */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "clock.h"

int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 300, i;
  int call = argc > 2 && strcmp(argv[2], "call") == 0;
  double t0;
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  if (luaL_dostring(L, "require 'multiprocessing'; "
                       "_G.empty = function() end") != LUA_OK) {
    fprintf(stderr, "%s\n", lua_tostring(L, -1));
    return 1;
  }
  t0 = now();
  for (i = 0; i < n; i++) {
    pid_t pid = fork();
    if (pid < 0) return 1;
    if (pid == 0) {
      if (call) {
        lua_getglobal(L, "empty");
        lua_pcall(L, 0, 0, 0);
      }
      _exit(0);
    }
    waitpid(pid, NULL, 0);
  }
  printf("%.1f\n", (double)n / (now() - t0));
  lua_close(L);
  return 0;
}
