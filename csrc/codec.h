/*
 * codec.h: the codec's wire format (docs/design.md, decision 3): the
 * message header and the tag bytes, whose table is at the head of codec.c.
 * codec.c (the whole codec) and codec_scalar.h/.c (its fast path for one
 * scalar, inline for the pool's per-value paths) write and read these
 * bytes; transports call those functions, never write tags themselves.
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

#endif
