/* shm.c: placeholder until its issue lands; registers nothing yet. */
#include "mp.h"

MP_API void mp_shm_open(lua_State *L) { (void)L; }
