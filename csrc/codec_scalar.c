/*
 * codec_scalar.c: the codec's fast path for one scalar (nil, a boolean, a
 * number, a string), for transports that carry many small values (the
 * pool's task arguments and results, the queue's records) and cannot pay
 * mp_encode's and mp_decode's setup for each.
 *
 * The bytes are exactly the codec's (docs/codec.md; codec.h lists the
 * tags, codec_scalar.h writes and reads a scalar for the encoder and the
 * decoder too): a value is its tag byte and payload, a message is the
 * version byte, a flags byte (0: no references) and one value. So
 * mp_decode_scalar reads what mp_encode writes for a scalar; it takes
 * only a message it is sure of (one well-formed scalar, nothing after it)
 * and leaves anything else, well-formed or not, to mp_decode, which
 * raises on what is wrong. The pool's per-value paths use
 * codec_scalar.h's inline functions directly. The queue's ring writes its items' messages in place
 * (mp_encode_number_at, mp_encode_strhead) and reads a long string's
 * bytes straight into a Lua string (mp_decode_strhead).
 */
#include "codec_scalar.h"

MP_API int mp_decode_scalar(lua_State *L, const char *p, size_t len) {
  return cs_decode(L, p, len);
}

/* The queue's ring writes a message in place: a boolean's or number's
   whole message, or a string's head that its bytes then follow. */
MP_API size_t mp_encode_number_at(lua_State *L, int idx, char *out) {
  unsigned char *w = (unsigned char *)out;
  w[0] = CODEC_VERSION;
  w[1] = 0;                              /* flags: no references */
  switch (lua_type(L, idx)) {
  case LUA_TBOOLEAN: w[2] = lua_toboolean(L, idx) ? T_TRUE : T_FALSE; return 3;
  case LUA_TNUMBER:
    return 2 + (lua_isinteger(L, idx) ? cs_wr_int(w + 2, lua_tointeger(L, idx))
                                      : cs_wr_float(w + 2, lua_tonumber(L, idx)));
  default: return 0;
  }
}

MP_API size_t mp_encode_strhead(size_t n, char *out) {
  unsigned char *w = (unsigned char *)out;
  w[0] = CODEC_VERSION;
  w[1] = 0;
  if (n <= SHORTSTR_MAX) {
    w[2] = (unsigned char)(T_SHORTSTR + n);
    return 3;
  }
  w[2] = T_STR;
  return 3 + cs_put_varint(w + 3, (uint64_t)n);
}

MP_API int mp_decode_strhead(const char *p, size_t len, size_t *off) {
  const unsigned char *s = (const unsigned char *)p, *q = s + 3;
  const unsigned char *end = s + len;
  uint64_t n;
  if (len < 3 || s[0] != CODEC_VERSION || s[1] != 0) return 0;
  if (s[2] >= T_SHORTSTR && s[2] <= T_SHORTSTR + SHORTSTR_MAX)
    n = s[2] - T_SHORTSTR;
  else if (s[2] != T_STR || !cs_get_varint(&q, end, &n))
    return 0;
  if (n != (uint64_t)(end - q)) return 0;  /* the bytes fill the rest */
  *off = (size_t)(q - s);
  return 1;
}
