/*
 * codec_impl.h: what the codec's three files share; no other file
 * includes it. codec.c is the module's Lua side (mp.dumps, mp.loads,
 * mp.register, the handle kinds' registry) and owns the codec's tables,
 * the env; codec_enc.c is the encoder (mp_encode), codec_dec.c the
 * decoder (mp_decode). The format is codec.h's, its scalars
 * codec_scalar.h's (docs/design.md, decision 3: one codec).
 *
 * The env is one table in the registry, made on first use, that holds
 * every table the codec keeps between calls: the registered names both
 * ways, the handle kinds' rebuilds, the module maps the encoder names
 * module functions by, the bytecode cache, a spare output buffer.
 */
#ifndef MP_CODEC_IMPL_H
#define MP_CODEC_IMPL_H

#include "mp.h"
#include "codec_scalar.h"

#define MAXDEPTH MP_CODEC_MAXDEPTH
/* The fds that came with a message, while mp_decode runs (codec_dec.c). */
#define MP_CODEC_FDS_T "multiprocessing.codec.fds"

/* The env's fields. */
enum {
  E_BYNAME = 1,   /* registered name -> class or function */
  E_BYVAL,        /* class or function -> registered name */
  E_KINDS,        /* handle kind -> rebuild function */
  E_MODOF,        /* module table or module function -> module name (weak) */
  E_KEYOF,        /* module function -> its field name (weak) */
  E_SIGN,         /* package.loaded signature when E_MODOF was built */
  E_SIGX,
  E_BUF,          /* a spare output buffer for mp.dumps, or nil */
  E_PACK,         /* function(...) return {...} end */
  E_DUMPS,        /* Lua function -> its bytecode (weak keys) */
  E_N = E_DUMPS
};

/* The env's key in the registry (codec.c); mp_codec_env_new makes it. */
MP_API extern const char mp_codec_envkey;
MP_API void mp_codec_env_new(lua_State *L);

/* Push the env, made on first use (inline: every mp.loads asks for it). */
static inline void mp_codec_env(lua_State *L) {
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &mp_codec_envkey) == LUA_TTABLE) return;
  lua_pop(L, 1);
  mp_codec_env_new(L);
}
/* __gc and __close of MP_CODEC_FDS_T (codec_dec.c): close the fds that no
   handle took; the opener (codec.c) registers the class. */
MP_API int mp_codec_fds_close(lua_State *L);

#endif
