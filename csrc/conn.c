#include "mp.h"
MP_API void mp_conn_open(lua_State *L) { (void)L; }
