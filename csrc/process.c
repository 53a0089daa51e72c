#include "mp.h"
MP_API void mp_process_open(lua_State *L) { (void)L; }
