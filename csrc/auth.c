/*
 * auth.c: SHA-256 and HMAC-SHA256 (FIPS 180-4, RFC 2104) and random bytes,
 * for the authkey challenge of Listener and Client.
 *
 * The round constants are derived at first use from their definition (the
 * fractional parts of the cube roots of the first 64 primes; the initial
 * hash from square roots of the first 8), and checked by the specs against
 * known digests.
 */
#include "mp.h"

#include <errno.h>
#include <math.h>
#include <string.h>
#include <sys/random.h>

typedef struct sha256 {
  uint32_t h[8];
  uint64_t len;          /* bytes hashed so far */
  unsigned char blk[64];
  size_t n;              /* bytes waiting in blk */
} sha256;

static uint32_t K[64], H0[8];

static void init_constants(void) {
  int primes[64], n = 0, c;
  if (K[0]) return;
  for (c = 2; n < 64; c++) {
    int d, prime = 1;
    for (d = 2; d * d <= c; d++)
      if (c % d == 0) { prime = 0; break; }
    if (prime) primes[n++] = c;
  }
  for (n = 0; n < 64; n++) {
    double r = cbrt((double)primes[n]);
    K[n] = (uint32_t)((r - floor(r)) * 4294967296.0);
  }
  for (n = 0; n < 8; n++) {
    double r = sqrt((double)primes[n]);
    H0[n] = (uint32_t)((r - floor(r)) * 4294967296.0);
  }
}

#define ROR(x, k) (((x) >> (k)) | ((x) << (32 - (k))))

static void compress(sha256 *s, const unsigned char *p) {
  uint32_t w[64], a, b, c, d, e, f, g, h;
  int i;
  for (i = 0; i < 16; i++)
    w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
           (uint32_t)p[4 * i + 2] << 8 | (uint32_t)p[4 * i + 3];
  for (i = 16; i < 64; i++) {
    uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
    uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
    w[i] = w[i - 16] + s0 + w[i - 7] + s1;
  }
  a = s->h[0]; b = s->h[1]; c = s->h[2]; d = s->h[3];
  e = s->h[4]; f = s->h[5]; g = s->h[6]; h = s->h[7];
  for (i = 0; i < 64; i++) {
    uint32_t t1 = h + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) +
                  ((e & f) ^ (~e & g)) + K[i] + w[i];
    uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) +
                  ((a & b) ^ (a & c) ^ (b & c));
    h = g; g = f; f = e; e = d + t1;
    d = c; c = b; b = a; a = t1 + t2;
  }
  s->h[0] += a; s->h[1] += b; s->h[2] += c; s->h[3] += d;
  s->h[4] += e; s->h[5] += f; s->h[6] += g; s->h[7] += h;
}

static void sha_init(sha256 *s) {
  init_constants();
  memcpy(s->h, H0, sizeof H0);
  s->len = 0;
  s->n = 0;
}

static void sha_update(sha256 *s, const void *data, size_t len) {
  const unsigned char *p = (const unsigned char *)data;
  s->len += len;
  while (len > 0) {
    size_t k = 64 - s->n < len ? 64 - s->n : len;
    memcpy(s->blk + s->n, p, k);
    s->n += k; p += k; len -= k;
    if (s->n == 64) {
      compress(s, s->blk);
      s->n = 0;
    }
  }
}

static void sha_final(sha256 *s, unsigned char out[32]) {
  uint64_t bits = s->len * 8;
  unsigned char pad = 0x80, zero = 0, lenb[8];
  int i;
  sha_update(s, &pad, 1);
  while (s->n != 56) sha_update(s, &zero, 1);
  for (i = 0; i < 8; i++) lenb[i] = (unsigned char)(bits >> (56 - 8 * i));
  sha_update(s, lenb, 8);
  for (i = 0; i < 8; i++) {
    out[4 * i] = (unsigned char)(s->h[i] >> 24);
    out[4 * i + 1] = (unsigned char)(s->h[i] >> 16);
    out[4 * i + 2] = (unsigned char)(s->h[i] >> 8);
    out[4 * i + 3] = (unsigned char)s->h[i];
  }
}

static void hmac_sha256(const char *key, size_t klen, const char *msg,
                        size_t mlen, unsigned char out[32]) {
  unsigned char k[64], pad[64], inner[32];
  sha256 s;
  int i;
  memset(k, 0, sizeof k);
  if (klen > 64) {
    sha_init(&s);
    sha_update(&s, key, klen);
    sha_final(&s, k);
  } else {
    memcpy(k, key, klen);
  }
  for (i = 0; i < 64; i++) pad[i] = k[i] ^ 0x36;
  sha_init(&s);
  sha_update(&s, pad, 64);
  sha_update(&s, msg, mlen);
  sha_final(&s, inner);
  for (i = 0; i < 64; i++) pad[i] = k[i] ^ 0x5c;
  sha_init(&s);
  sha_update(&s, pad, 64);
  sha_update(&s, inner, 32);
  sha_final(&s, out);
}

/* core.sha256(s) -> 32-byte digest */
static int auth_sha256(lua_State *L) {
  size_t len;
  const char *p = luaL_checklstring(L, 1, &len);
  unsigned char out[32];
  sha256 s;
  sha_init(&s);
  sha_update(&s, p, len);
  sha_final(&s, out);
  lua_pushlstring(L, (const char *)out, 32);
  return 1;
}

/* core.hmac_sha256(key, msg) -> 32-byte MAC */
static int auth_hmac(lua_State *L) {
  size_t klen, mlen;
  const char *key = luaL_checklstring(L, 1, &klen);
  const char *msg = luaL_checklstring(L, 2, &mlen);
  unsigned char out[32];
  hmac_sha256(key, klen, msg, mlen, out);
  lua_pushlstring(L, (const char *)out, 32);
  return 1;
}

/* core.random_bytes(n) -> n bytes from the kernel's CSPRNG */
static int auth_random(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  unsigned char buf[256];
  size_t got = 0;
  luaL_argcheck(L, n >= 0 && n <= 256, 1, "between 0 and 256 bytes");
  while (got < (size_t)n) {
    ssize_t r = getrandom(buf + got, (size_t)n - got, 0);
    if (r < 0) {
      if (errno == EINTR) continue;
      return luaL_error(L, "getrandom: %s", strerror(errno));
    }
    got += (size_t)r;
  }
  lua_pushlstring(L, (const char *)buf, (size_t)n);
  return 1;
}

/* core.equal_digest(a, b) -> boolean, in time independent of where they
   differ */
static int auth_equal(lua_State *L) {
  size_t la, lb, i;
  const char *a = luaL_checklstring(L, 1, &la);
  const char *b = luaL_checklstring(L, 2, &lb);
  unsigned char d = 0;
  if (la != lb) {
    lua_pushboolean(L, 0);
    return 1;
  }
  for (i = 0; i < la; i++) d |= (unsigned char)(a[i] ^ b[i]);
  lua_pushboolean(L, d == 0);
  return 1;
}

MP_API void mp_auth_open(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"sha256", auth_sha256},
    {"hmac_sha256", auth_hmac},
    {"random_bytes", auth_random},
    {"equal_digest", auth_equal},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
}
