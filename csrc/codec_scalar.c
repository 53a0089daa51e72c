/*
 * codec_scalar.c: the codec's fast path for one scalar (nil, a boolean, a
 * number, a string), for transports that carry many small values (the
 * pool's task arguments and results) and cannot pay mp_encode's and
 * mp_decode's setup for each.
 *
 * The bytes are exactly codec.c's (docs/codec.md; codec.c's header lists
 * the tags): a value is its tag byte and payload, a message is the
 * version byte, a flags byte (0: no references) and one value. So what
 * mp_encode_scalar writes mp_decode reads, and mp_decode_scalar reads what
 * mp_encode writes for a scalar; mp_decode_scalar takes only a message it
 * is sure of (one well-formed scalar, nothing after it) and leaves
 * anything else, well-formed or not, to mp_decode, which raises on what is
 * wrong. The value-level functions (mp_scalar_put_*, mp_scalar_get) are
 * the ones codec.c's encoder and decoder can share. The bytes are
 * written and read by codec_scalar.h's inline functions, which the
 * pool's per-value paths use directly.
 */
#include "codec_scalar.h"

MP_API void mp_scalar_put_int(lua_State *L, mp_buf *b, lua_Integer i) {
  if (b->cap - b->len < 11) mp_buf_reserve(L, b, 11);
  b->len += cs_wr_int((unsigned char *)b->data + b->len, i);
}

MP_API void mp_scalar_put_float(lua_State *L, mp_buf *b, lua_Number x) {
  if (b->cap - b->len < 11) mp_buf_reserve(L, b, 11);
  b->len += cs_wr_float((unsigned char *)b->data + b->len, x);
}

MP_API void mp_scalar_put_str(lua_State *L, mp_buf *b, const char *s, size_t n) {
  mp_buf_reserve(L, b, n + 11);
  b->len += cs_wr_str((unsigned char *)b->data + b->len, s, n);
}

MP_API int mp_scalar_put(lua_State *L, mp_buf *b, int idx) {
  return cs_put(L, b, idx, lua_type(L, idx), 0);
}

MP_API const char *mp_scalar_get(lua_State *L, const char *p, const char *end) {
  return cs_get(L, p, end);
}

MP_API int mp_encode_scalar(lua_State *L, int idx, mp_buf *b) {
  return cs_encode(L, idx, lua_type(L, idx), b);
}

MP_API int mp_decode_scalar(lua_State *L, const char *p, size_t len) {
  return cs_decode(L, p, len);
}
