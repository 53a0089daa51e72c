/*
 * codec.h: the codec's wire format (docs/design.md, decision 3): the
 * message header and the tag bytes, whose table is at the head of codec.c.
 * codec.c (the whole codec) and codec_scalar.c (its fast path for one
 * boolean, number or string) write and read these bytes; no other file
 * includes this header: transports call the codec's functions (mp.h).
 */
#ifndef MP_CODEC_H
#define MP_CODEC_H

#include "mp.h"

#define CODEC_VERSION 1    /* a message's first byte */
#define F_REFS 1           /* its second, the flags: the message has references */

enum {
  T_NIL, T_FALSE, T_TRUE, T_INT, T_FLOAT, T_STR, T_TABLE, T_TABLE_MT, T_REF,
  T_GLOBALS, T_MODULE, T_FN_REG, T_FN_MOD, T_FN_LUA, T_HANDLE
};
#define T_SHORTSTR 0x40    /* 0x40..0x5f: a string of tag - 0x40 bytes */
#define SHORTSTR_MAX 31
#define T_FIXINT 0x80      /* 0x80..0xff: the integer tag - 0x80 */

/* codec_scalar.c's pieces of a value (no message header): */
/* The varint (LEB128) of v at w: its length, at most 10. */
MP_API size_t mp_codec_put_varint(unsigned char *w, uint64_t v);
/* Read a varint at *p (before end), moving *p past it: 1, or 0 when it is
   truncated or beyond 64 bits. */
MP_API int mp_codec_get_varint(const unsigned char **p,
                               const unsigned char *end, uint64_t *v);
/* The number at idx as a value (tag and body) at w: its length, at most
   11 (a small integer in its tag, another as a zigzag varint, a float as
   8 bytes). */
MP_API size_t mp_codec_put_number(lua_State *L, int idx, unsigned char *w);
/* The head (tag, length) of a string of n bytes at w: its length, at most
   11; the bytes follow. */
MP_API size_t mp_codec_put_strhead(size_t n, unsigned char *w);

#endif
