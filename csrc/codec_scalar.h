/*
 * codec_scalar.h: the codec's format for one scalar (nil, a boolean, a
 * number, a string), as inline functions: the one definition of those
 * bytes (the tags are codec.h's). The codec's encoder (codec_enc.c) writes
 * every scalar with cs_wr_int, cs_wr_float and cs_wr_str, and its decoder
 * (codec_dec.c) reads their payloads with cs_get_varint, cs_unzigzag and
 * cs_get_f64, adding the bounds checks and the error messages that
 * untrusted input needs. The paths that run once per value use the rest
 * directly (codec_scalar.c's mp_decode_scalar, the
 * pool's task and result items), where a call per value is measurable.
 * cs_put writes a value; cs_get reads a value and refuses (NULL, nothing pushed)
 * what is not one well-formed scalar; cs_decode is the
 * whole-message reader.
 */
#ifndef MP_CODEC_SCALAR_H
#define MP_CODEC_SCALAR_H

#include "mp.h"
#include "codec.h"

#include <string.h>

static inline size_t cs_put_varint(unsigned char *w, uint64_t v) {
  size_t n = 0;
  if (v < 0x4000) {                      /* the common short ones, unrolled */
    if (v < 0x80) {
      w[0] = (unsigned char)v;
      return 1;
    }
    w[0] = (unsigned char)(v | 0x80);
    w[1] = (unsigned char)(v >> 7);
    return 2;
  }
  while (v >= 0x80) {
    w[n++] = (unsigned char)(v | 0x80);
    v >>= 7;
  }
  w[n++] = (unsigned char)v;
  return n;
}

/* The varint at *p (< end), advancing *p; 0 when it is cut or longer
   than 64 bits (codec_dec.c's rd_varint tells which). */
static inline int cs_get_varint(const unsigned char **p, const unsigned char *end,
                             uint64_t *v) {
  const unsigned char *q = *p;
  uint64_t x = 0;
  int shift;
  for (shift = 0; shift <= 63; shift += 7) {
    unsigned c;
    if (q >= end) return 0;
    c = *q++;
    x |= (uint64_t)(c & 0x7f) << shift;
    if (c < 0x80) {
      if (shift == 63 && c > 1) return 0;
      *v = x;
      *p = q;
      return 1;
    }
  }
  return 0;
}

/* The varint at q when at least 10 bytes may be read there (no bounds
   checks: the caller knows): the position after it, or NULL when it is
   longer than 64 bits. The same values as cs_get_varint. */
static inline const unsigned char *cs_get_varint10(const unsigned char *q, uint64_t *v) {
  uint64_t x = 0;
  int k;
  for (k = 0; k < 9; k++) {              /* unrolled by the compiler */
    unsigned c = q[k];
    x |= (uint64_t)(c & 0x7f) << (7 * k);
    if (c < 0x80) {
      *v = x;
      return q + k + 1;
    }
  }
  if (q[9] > 1) return NULL;             /* the tenth byte holds bit 63 */
  *v = x | (uint64_t)q[9] << 63;
  return q + 10;
}

/* An integer as a varint: zigzag, so that small magnitudes of either
   sign are short. */
static inline uint64_t cs_zigzag(lua_Integer i) {
  uint64_t u = (uint64_t)i;
  return (u << 1) ^ (i < 0 ? ~(uint64_t)0 : 0);
}

static inline lua_Integer cs_unzigzag(uint64_t v) {
  return (lua_Integer)((v >> 1) ^ (~(v & 1) + 1));
}

/* A float's payload: the IEEE 754 double, 8 bytes little-endian. */
static inline void cs_put_f64(unsigned char *w, lua_Number x) {
  double d = (double)x;
  uint64_t u;
  memcpy(&u, &d, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  memcpy(w, &u, 8);
#else
  { int j; for (j = 0; j < 8; j++) w[j] = (unsigned char)(u >> (8 * j)); }
#endif
}

/* The float whose 8 payload bytes are at q (the caller checked them). */
static inline lua_Number cs_get_f64(const unsigned char *q) {
  uint64_t u;
  double x;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  memcpy(&u, q, 8);
#else
  { int j; for (u = 0, j = 0; j < 8; j++) u |= (uint64_t)q[j] << (8 * j); }
#endif
  memcpy(&x, &u, 8);
  return (lua_Number)x;
}

/* Write one value at w, which has room for 11 bytes (n + 11 for a
   string); the bytes written. */
static inline size_t cs_wr_int(unsigned char *w, lua_Integer i) {
  if (i >= 0 && i < 0x80) {
    w[0] = (unsigned char)(T_FIXINT | (int)i);
    return 1;
  }
  w[0] = T_INT;
  return 1 + cs_put_varint(w + 1, cs_zigzag(i));
}

static inline size_t cs_wr_float(unsigned char *w, lua_Number x) {
  w[0] = T_FLOAT;
  cs_put_f64(w + 1, x);
  return 9;
}

static inline size_t cs_wr_str(unsigned char *w, const char *s, size_t n) {
  size_t k;
  if (n <= SHORTSTR_MAX) {
    w[0] = (unsigned char)(T_SHORTSTR + n);
    memcpy(w + 1, s, n);
    return 1 + n;
  }
  w[0] = T_STR;
  k = 1 + cs_put_varint(w + 1, n);
  memcpy(w + k, s, n);
  return k + n;
}

/* Append the scalar value at idx, of type t, to b: 1; 0 (nothing
   appended) when t is no scalar type. */
static inline int cs_put(lua_State *L, mp_buf *b, int idx, int t) {
  unsigned char *w;
  size_t n = 0;
  const char *s = NULL;
  if (t == LUA_TSTRING) s = lua_tolstring(L, idx, &n);
  else if (t != LUA_TNUMBER && t != LUA_TNIL && t != LUA_TBOOLEAN) return 0;
  if (b->cap - b->len < n + 11) mp_buf_reserve(L, b, n + 11);
  w = (unsigned char *)b->data + b->len;
  switch (t) {
  case LUA_TNUMBER:
    n = lua_isinteger(L, idx) ? cs_wr_int(w, lua_tointeger(L, idx))
                              : cs_wr_float(w, lua_tonumber(L, idx));
    break;
  case LUA_TSTRING: n = cs_wr_str(w, s, n); break;
  case LUA_TNIL: w[0] = T_NIL; n = 1; break;
  default: w[0] = lua_toboolean(L, idx) ? T_TRUE : T_FALSE; n = 1; break;
  }
  b->len += n;
  return 1;
}

static inline const char *cs_get(lua_State *L, const char *p, const char *end) {
  const unsigned char *q = (const unsigned char *)p, *e = (const unsigned char *)end;
  unsigned tag;
  uint64_t v;
  if (q >= e) return NULL;
  tag = *q++;
  if (tag >= T_FIXINT) {
    lua_pushinteger(L, (lua_Integer)(tag - T_FIXINT));
  } else if (tag == T_INT) {                   /* the next most common */
    if (!cs_get_varint(&q, e, &v)) return NULL;
    lua_pushinteger(L, cs_unzigzag(v));
  } else if (tag >= T_SHORTSTR && tag <= T_SHORTSTR + SHORTSTR_MAX) {
    size_t n = tag - T_SHORTSTR;
    if ((size_t)(e - q) < n) return NULL;
    lua_pushlstring(L, (const char *)q, n);
    q += n;
  } else {
    switch (tag) {
    case T_NIL: lua_pushnil(L); break;
    case T_FALSE: lua_pushboolean(L, 0); break;
    case T_TRUE: lua_pushboolean(L, 1); break;
    case T_FLOAT:
      if (e - q < 8) return NULL;
      lua_pushnumber(L, cs_get_f64(q));
      q += 8;
      break;
    case T_STR:
      if (!cs_get_varint(&q, e, &v) || v > (uint64_t)(e - q)) return NULL;
      lua_pushlstring(L, (const char *)q, (size_t)v);
      q += v;
      break;
    default:
      return NULL;                       /* not a scalar */
    }
  }
  return (const char *)q;
}

/* Push the value of the message p[0 .. len) if it is one well-formed
   scalar: 1; else 0, nothing pushed (mp_decode's then). */
static inline int cs_decode(lua_State *L, const char *p, size_t len) {
  const char *q;
  if (len < 3 || p[0] != CODEC_VERSION || p[1] != 0) return 0;
  q = cs_get(L, p + 2, p + len);
  if (q == NULL) return 0;
  if (q != p + len) {                    /* more after it: mp_decode's */
    lua_pop(L, 1);
    return 0;
  }
  return 1;
}

#endif
