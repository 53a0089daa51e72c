/*
 * embed.c: mp_child_main, the one entry of a host that embeds Lua
 * (multiprocessing.h): in a spawned child (argv is `exe -e "<bootstrap
 * chunk>"`, the chunk beginning with MP_SPAWN_MARK) it makes the host's
 * own Lua state, preloads multiprocessing.core in it if the host did not,
 * and runs the bootstrap, which leaves through core._exit (docs/design.md,
 * decision 8); in any other process it returns -1 at once.
 */
#include "mp.h"
#include "multiprocessing.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

MP_EXPORT int mp_child_main(int argc, char **argv,
                            lua_State *(*new_state)(void)) {
  lua_State *L;
  int code = 1;
  if (argc < 3 || argv == NULL || argv[1] == NULL || argv[2] == NULL ||
      strcmp(argv[1], "-e") != 0 ||
      strncmp(argv[2], MP_SPAWN_MARK, sizeof MP_SPAWN_MARK - 1) != 0)
    return -1;
  L = new_state ? new_state() : NULL;
  if (L == NULL) {
    fprintf(stderr, "multiprocessing: spawned child %d: no Lua state\n",
            (int)getpid());
    return 1;
  }
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  if (lua_getfield(L, -1, "multiprocessing.core") == LUA_TNIL) {
    lua_pushcfunction(L, luaopen_multiprocessing_core);
    lua_setfield(L, -3, "multiprocessing.core");
  }
  lua_pop(L, 2);
  if (luaL_dostring(L, argv[2]) != LUA_OK) {
    const char *msg = lua_tostring(L, -1);
    fprintf(stderr, "multiprocessing: spawned child %d: %s\n", (int)getpid(),
            msg ? msg : "(error object)");
  } else {
    code = 0;
  }
  lua_close(L);
  return code;
}

