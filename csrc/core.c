/*
 * core.c: luaopen_multiprocessing_core, the table of openers: each C file
 * registers its classes and functions in its own *_open (ground.c holds
 * what every file uses; see docs/design.md, "The layers").
 */
#include "mp.h"
#include "multiprocessing.h"

/* require "multiprocessing.core" */
MP_EXPORT int luaopen_multiprocessing_core(lua_State *L) {
  /* each file's opener, in order: the codec first (the others register
     their handle kinds with it) */
  static void (*const openers[])(lua_State *) = {
    mp_ground_open, mp_codec_open, mp_osutil_open, mp_fdpass_open,
    mp_process_open, mp_conn_open, mp_listener_open, mp_shm_open,
    mp_sync_open, mp_sharedctypes_open, mp_queue_open, mp_pool_open,
    mp_pool_worker_open, NULL
  };
  int i;
  lua_newtable(L);
  for (i = 0; openers[i] != NULL; i++) openers[i](L);
  return 1;
}
