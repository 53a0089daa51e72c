/*
 * codec.h: the codec's wire format (docs/design.md, decision 3: one
 * codec), its one definition: the message header and the tag bytes.
 * codec_enc.c writes it, codec_dec.c reads it, codec_scalar.h (the bytes
 * of one scalar, which both use) and codec_scalar.c (the fast path for a
 * message of one scalar) share it; transports call their functions,
 * never write tags themselves.
 *
 * A message is a version byte (CODEC_VERSION), a flags byte (F_REFS: the
 * message holds references, so the decoder must remember every table,
 * function and handle by id; without it, it remembers none), then one
 * value. A value starts with a tag byte:
 *   0x00 nil  0x01 false  0x02 true
 *   0x03 INT      zigzag varint (LEB128)
 *   0x04 FLOAT    8 bytes, IEEE 754 double, little-endian
 *   0x05 STR      varint length, bytes
 *   0x06 TABLE    u32 n, u32 m, then n values (keys 1..n), then m
 *                 key/value pairs (all other keys)
 *   0x07 TABLE_MT string (registered class name), then as TABLE
 *   0x08 REF      varint id: a table, Lua function or handle seen before
 *   0x09 GLOBALS  the receiver's global table
 *   0x0a MODULE   string: package.loaded[name] (required if need be)
 *   0x0b FN_REG   string: a function registered with mp.register
 *   0x0c FN_MOD   string module, string field: package.loaded[mod][field]
 *   0x0d FN_LUA   u32 length, bytecode (lua_dump, line info kept), varint
 *                 number of upvalues, then per upvalue 0x00 + value (a new
 *                 upvalue) or 0x01 + varint k (joined to the k-th upvalue
 *                 of the message: functions sharing an upvalue)
 *   0x0e HANDLE   string kind, varint nfds, nfds varint positions in the
 *                 message's fd list, then the state value
 *   0x0f TBL_REG  string: a table registered with mp.register (a class, a
 *                 metatable), which travels by its name wherever it is
 *   0x40..0x5f    string of length tag - 0x40 (short strings inline)
 *   0x80..0xff    integer tag - 0x80 (0..127 inline)
 * Strings inside tags (names, kinds) are STR or short-string values.
 * Ids count tables (at creation, before their contents), Lua functions
 * (after the bytecode, before the upvalues) and handles (after the state),
 * in message order, on both sides, so shared references and cycles survive.
 */
#ifndef MP_CODEC_H
#define MP_CODEC_H

#include "mp.h"

#define CODEC_VERSION 1    /* a message's first byte */
#define F_REFS 1           /* its second, the flags: the message has references */

enum {
  T_NIL, T_FALSE, T_TRUE, T_INT, T_FLOAT, T_STR, T_TABLE, T_TABLE_MT, T_REF,
  T_GLOBALS, T_MODULE, T_FN_REG, T_FN_MOD, T_FN_LUA, T_HANDLE, T_TBL_REG
};
#define T_SHORTSTR 0x40    /* 0x40..0x5f: a string of tag - 0x40 bytes */
#define SHORTSTR_MAX 31
#define T_FIXINT 0x80      /* 0x80..0xff: the integer tag - 0x80 */

#endif
