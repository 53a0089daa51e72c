/*
 * codec_scalar.c: the codec's fast path for a message that is one boolean,
 * number or string (docs/design.md, decision 3), for transports that move
 * such items by the million (the queue's records).
 *
 * The bytes are the codec's own (codec.h), exactly what mp_encode makes
 * and mp_decode reads, so a message made here may be decoded there and
 * the other way round; only the general encoder's set-up (its tables,
 * its reference hash) is skipped. A string's message is written as a
 * head (header, tag, length) that the bytes follow, so a transport can
 * copy the bytes straight from the Lua string, and read them straight
 * into one. The decoder here is as wary as codec.c's: it reads only
 * inside the message and takes nothing it does not fully recognize
 * (then mp_decode decodes it, or says what is wrong).
 *
 * Its pieces (varints, a number's bytes, a string's head; codec.h) are
 * written so that codec.c's encoder and decoder can use them too.
 */
#include "mp.h"
#include "codec.h"

#include <string.h>

MP_API size_t mp_codec_put_varint(unsigned char *w, uint64_t v) {
  size_t n = 0;
  while (v >= 0x80) {
    w[n++] = (unsigned char)(v | 0x80);
    v >>= 7;
  }
  w[n++] = (unsigned char)v;
  return n;
}

MP_API int mp_codec_get_varint(const unsigned char **p,
                               const unsigned char *end, uint64_t *v) {
  int shift = 0;
  *v = 0;
  for (;;) {
    unsigned c;
    if (*p >= end) return 0;
    c = *(*p)++;
    if (shift == 63 && c > 1) return 0;
    *v |= (uint64_t)(c & 0x7f) << shift;
    if (!(c & 0x80)) return 1;
    shift += 7;
    if (shift > 63) return 0;
  }
}

MP_API size_t mp_codec_put_number(lua_State *L, int idx, unsigned char *w) {
  if (lua_isinteger(L, idx)) {
    lua_Integer i = lua_tointeger(L, idx);
    uint64_t u = (uint64_t)i;
    if (i >= 0 && i < 0x80) {
      w[0] = (unsigned char)(T_FIXINT | (int)i);
      return 1;
    }
    w[0] = T_INT;                        /* zigzag, then varint */
    return 1 + mp_codec_put_varint(w + 1, (u << 1) ^ (i < 0 ? ~(uint64_t)0 : 0));
  } else {
    double d = (double)lua_tonumber(L, idx);
    uint64_t u;
    int j;
    memcpy(&u, &d, 8);
    w[0] = T_FLOAT;                      /* IEEE 754, little-endian */
    for (j = 0; j < 8; j++) w[1 + j] = (unsigned char)(u >> (8 * j));
    return 9;
  }
}

MP_API size_t mp_codec_put_strhead(size_t n, unsigned char *w) {
  if (n <= SHORTSTR_MAX) {
    w[0] = (unsigned char)(T_SHORTSTR + n);
    return 1;
  }
  w[0] = T_STR;
  return 1 + mp_codec_put_varint(w + 1, (uint64_t)n);
}

MP_API size_t mp_encode_scalar(lua_State *L, int idx, char *out) {
  unsigned char *w = (unsigned char *)out;
  w[0] = CODEC_VERSION;
  w[1] = 0;                              /* no references */
  switch (lua_type(L, idx)) {
  case LUA_TBOOLEAN: w[2] = lua_toboolean(L, idx) ? T_TRUE : T_FALSE; return 3;
  case LUA_TNUMBER: return 2 + mp_codec_put_number(L, idx, w + 2);
  default: return 0;
  }
}

MP_API size_t mp_encode_strhead(size_t n, char *out) {
  unsigned char *w = (unsigned char *)out;
  w[0] = CODEC_VERSION;
  w[1] = 0;
  return 2 + mp_codec_put_strhead(n, w + 2);
}

MP_API int mp_decode_strhead(const char *p, size_t len, size_t *off) {
  const unsigned char *s = (const unsigned char *)p, *q = s + 3;
  const unsigned char *end = s + len;
  uint64_t n;
  if (len < 3 || s[0] != CODEC_VERSION || s[1] != 0) return 0;
  if (s[2] >= T_SHORTSTR && s[2] <= T_SHORTSTR + SHORTSTR_MAX)
    n = s[2] - T_SHORTSTR;
  else if (s[2] != T_STR || !mp_codec_get_varint(&q, end, &n))
    return 0;
  if (n != (uint64_t)(end - q)) return 0;  /* the bytes fill the rest */
  *off = (size_t)(q - s);
  return 1;
}

MP_API int mp_decode_scalar(lua_State *L, const char *p, size_t len) {
  const unsigned char *s = (const unsigned char *)p, *q = s + 3;
  const unsigned char *end = s + len;
  size_t off;
  unsigned tag;
  if (len < 3 || s[0] != CODEC_VERSION || s[1] != 0) return 0;
  tag = s[2];
  if (tag >= T_FIXINT) {
    if (len != 3) return 0;
    lua_pushinteger(L, (lua_Integer)(tag - T_FIXINT));
    return 1;
  }
  switch (tag) {
  case T_FALSE: case T_TRUE:
    if (len != 3) return 0;
    lua_pushboolean(L, tag == T_TRUE);
    return 1;
  case T_INT: {
    uint64_t z;
    if (!mp_codec_get_varint(&q, end, &z) || q != end) return 0;
    lua_pushinteger(L, (lua_Integer)((z >> 1) ^ (~(z & 1) + 1)));
    return 1;
  }
  case T_FLOAT: {
    uint64_t u = 0;
    double d;
    int j;
    if (len != 11) return 0;
    for (j = 0; j < 8; j++) u |= (uint64_t)q[j] << (8 * j);
    memcpy(&d, &u, 8);
    lua_pushnumber(L, (lua_Number)d);
    return 1;
  }
  default:
    if (!mp_decode_strhead(p, len, &off)) return 0;
    lua_pushlstring(L, p + off, len - off);
    return 1;
  }
}
