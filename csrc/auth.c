/*
 * auth.c: the crypto of the authkey challenge of Listener and Client
 * (SHA-256, HMAC-SHA256, random challenges, digest comparison), from
 * OpenSSL's libcrypto (3.0 or later; Debian: libssl-dev).
 *
 * Why libcrypto: hashing and MACs are code to take from a maintained,
 * reviewed and constant-time implementation rather than to write by hand.
 * It provides:
 *   - SHA-256 through EVP_Digest, HMAC-SHA256 through the EVP_MAC "HMAC"
 *     interface (OpenSSL 3's non-deprecated API);
 *   - random bytes from RAND_bytes, its CSPRNG, seeded from the kernel and
 *     reseeded in a forked child (a child never repeats its parent's bytes);
 *   - CRYPTO_memcmp, a comparison whose time does not depend on where the
 *     inputs differ.
 * The specs check the digests against FIPS 180-4 and RFC 4231 vectors.
 *
 * A module of its own, multiprocessing.auth (auth.so), not part of the
 * core: loading libcrypto costs every interpreter that loads it about
 * 0.6 ms (measured here: a spawned child's start, 1.3 ms to load the core
 * alone), so only a process that runs an authkey handshake pays it
 * (connection.lua requires it on first use).
 */
#include "mp.h"
#include "multiprocessing.h"

#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/rand.h>

#define DIGEST_LEN 32

/* Raise with what libcrypto says about its last failure. */
static int crypto_error(lua_State *L, const char *what) {
  char buf[256];
  unsigned long e = ERR_get_error();
  ERR_clear_error();
  if (e == 0) return luaL_error(L, "%s failed", what);
  ERR_error_string_n(e, buf, sizeof buf);
  return luaL_error(L, "%s: %s", what, buf);
}

/* core.sha256(s) -> 32-byte digest */
static int auth_sha256(lua_State *L) {
  size_t len;
  const char *p = luaL_checklstring(L, 1, &len);
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int outlen = 0;
  if (!EVP_Digest(p, len, out, &outlen, EVP_sha256(), NULL) || outlen != DIGEST_LEN)
    return crypto_error(L, "sha256");
  lua_pushlstring(L, (const char *)out, DIGEST_LEN);
  return 1;
}

/* HMAC-SHA256 of msg under key into out; 0 on failure (libcrypto's error
   queue says why). */
static int hmac_sha256(const char *key, size_t klen, const char *msg,
                       size_t mlen, unsigned char out[DIGEST_LEN]) {
  static const unsigned char nokey[1] = { 0 };
  char digest[] = "SHA256";
  OSSL_PARAM params[2];
  EVP_MAC *mac;
  EVP_MAC_CTX *ctx = NULL;
  size_t outlen = 0;
  int ok = 0;
  params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0);
  params[1] = OSSL_PARAM_construct_end();
  mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
  if (mac) ctx = EVP_MAC_CTX_new(mac);
  /* an empty key is a valid HMAC key: give a pointer all the same, since a
     NULL key means "keep the previous one" to EVP_MAC_init */
  if (ctx && EVP_MAC_init(ctx, klen ? (const unsigned char *)key : nokey, klen, params) &&
      EVP_MAC_update(ctx, (const unsigned char *)msg, mlen) &&
      EVP_MAC_final(ctx, out, &outlen, DIGEST_LEN) && outlen == DIGEST_LEN)
    ok = 1;
  EVP_MAC_CTX_free(ctx);
  EVP_MAC_free(mac);
  return ok;
}

/* core.hmac_sha256(key, msg) -> 32-byte MAC */
static int auth_hmac(lua_State *L) {
  size_t klen, mlen;
  const char *key = luaL_checklstring(L, 1, &klen);
  const char *msg = luaL_checklstring(L, 2, &mlen);
  unsigned char out[DIGEST_LEN];
  if (!hmac_sha256(key, klen, msg, mlen, out)) return crypto_error(L, "hmac_sha256");
  lua_pushlstring(L, (const char *)out, DIGEST_LEN);
  return 1;
}

/* core.random_bytes(n) -> n bytes from libcrypto's CSPRNG */
static int auth_random(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  unsigned char buf[256];
  luaL_argcheck(L, n >= 0 && n <= 256, 1, "between 0 and 256 bytes");
  if (n > 0 && RAND_bytes(buf, (int)n) != 1) return crypto_error(L, "random_bytes");
  lua_pushlstring(L, (const char *)buf, (size_t)n);
  return 1;
}

/* core.equal_digest(a, b) -> boolean, in time independent of where they
   differ (the lengths, public, are compared first) */
static int auth_equal(lua_State *L) {
  size_t la, lb;
  const char *a = luaL_checklstring(L, 1, &la);
  const char *b = luaL_checklstring(L, 2, &lb);
  lua_pushboolean(L, la == lb && CRYPTO_memcmp(a, b, la) == 0);
  return 1;
}

/* require "multiprocessing.auth" */
MP_EXPORT int luaopen_multiprocessing_auth(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"sha256", auth_sha256},
    {"hmac_sha256", auth_hmac},
    {"random_bytes", auth_random},
    {"equal_digest", auth_equal},
    {NULL, NULL}
  };
  luaL_newlib(L, funcs);
  return 1;
}
