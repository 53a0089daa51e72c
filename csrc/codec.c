/* codec.c: placeholder; the real codec replaces this file. */
#include "mp.h"
MP_API void mp_encode(lua_State *L, int idx, mp_buf *b, mp_fdlist *fds) {
  size_t n; const char *s; (void)fds;
  s = lua_tolstring(L, idx, &n);
  if (s == NULL) luaL_error(L, "codec not ready");
  mp_buf_add(L, b, s, n);
}
MP_API void mp_decode(lua_State *L, const char *p, size_t len, mp_fdlist *fds, int flags) {
  (void)flags; if (fds) mp_fdlist_close(fds); lua_pushlstring(L, p, len);
}
MP_API void mp_codec_open(lua_State *L) { (void)L; }
