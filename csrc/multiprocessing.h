/*
 * multiprocessing.h: the public C API for hosts that embed Lua 5.4.
 *
 * A host links multiprocessing/core.so (or its objects) and opens the module
 * with luaopen_multiprocessing_core (or preloads it as
 * "multiprocessing.core"); the Lua part is found on package.path.
 */
#ifndef MULTIPROCESSING_H
#define MULTIPROCESSING_H

#include "lua.h"

#ifndef MP_EXPORT
#define MP_EXPORT __attribute__((visibility("default")))
#endif

/* require "multiprocessing.core" */
MP_EXPORT int luaopen_multiprocessing_core(lua_State *L);

#endif
