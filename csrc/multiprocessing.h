/*
 * multiprocessing.h: the public C API for hosts that embed Lua 5.4.
 *
 * A host links the library (the C files of csrc, or multiprocessing/core.so) and opens
 * the C core with luaopen_multiprocessing_core, usually by preloading it:
 *
 *   luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
 *   lua_pushcfunction(L, luaopen_multiprocessing_core);
 *   lua_setfield(L, -2, "multiprocessing.core");
 *
 * The Lua part (require "multiprocessing") is found on package.path.
 *
 * Spawned children (start methods "spawn" and "forkserver") run the
 * program mp.set_executable named as `exe -e "<bootstrap chunk>"`. A host
 * that names itself calls mp_child_main first thing in main(): in such a
 * child it builds a Lua state with the host's own factory (so the child has
 * the host's C functions), runs the child and returns its exit code (in
 * fact the child leaves through _exit and this returns only on a failure
 * before that); in any other process it returns -1 at once.
 */
#ifndef MULTIPROCESSING_H
#define MULTIPROCESSING_H

#include "lua.h"

#ifndef MP_EXPORT
#define MP_EXPORT __attribute__((visibility("default")))
#endif

/* How the bootstrap chunk of a spawned child begins (argv[2]). */
#define MP_SPAWN_MARK " --[[multiprocessing spawn]]"

/* require "multiprocessing.core" */
MP_EXPORT int luaopen_multiprocessing_core(lua_State *L);
/* require "multiprocessing.auth": the authkey handshake's crypto (csrc/auth.c,
   linked with libcrypto); loaded only by a process that runs a handshake.
   A host preloads it too if its programs use authkeys. */
MP_EXPORT int luaopen_multiprocessing_auth(lua_State *L);

/* In a spawned child: new_state() (which must open the standard libraries;
   "multiprocessing.core" is preloaded here if the state does not have it),
   run the child, return its exit code. Otherwise: -1. */
MP_EXPORT int mp_child_main(int argc, char **argv, lua_State *(*new_state)(void));

#endif
