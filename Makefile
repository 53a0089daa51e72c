# multiprocessing for Lua 5.4
#   make            build multiprocessing/core.so and auth.so into lua/
#   make run        set up, build and run the flagship example
#   make test       set up, build and run the specs (last line: N passed, N failed)
#   make examples   run every example
#   make bench      benchmarks, side by side with Python's multiprocessing
#   make chaos      fault and attack trials (docs/reliability.md)
#   make fuzz       fuzz the decoder
#   make install PREFIX=/usr/local
LUA        ?= lua5.4
LUA_INCDIR ?= /usr/include/lua5.4
PREFIX     ?= /usr/local
LUA_LIBDIR ?= $(PREFIX)/lib/lua/5.4
LUA_SHAREDIR ?= $(PREFIX)/share/lua/5.4
CC         ?= cc
CFLAGS     ?= -O2 -g
WERROR     ?= -Werror
WARN = -std=c99 -Wall -Wextra -Wshadow -Wmissing-prototypes -Wstrict-prototypes \
       -Wpointer-arith -Wcast-qual -Wundef $(WERROR)
ALL_CFLAGS = $(CFLAGS) $(WARN) -fPIC -fvisibility=hidden -I$(LUA_INCDIR) -Icsrc
LDFLAGS_SO = -shared
LIBS       = -lm
# the authkey handshake's crypto is a module of its own (csrc/auth.c), so
# that only a process that runs a handshake loads libcrypto
AUTH_LIBS  = -lcrypto
# the cluster pool's Redis client is a module of its own too (csrc/redis/,
# outside the core's wildcard), so that only a cluster program loads hiredis
REDIS_LIBS = -lhiredis

SRC  = $(wildcard csrc/*.c)
CORE_SRC = $(filter-out csrc/auth.c,$(SRC))
HDR  = $(wildcard csrc/*.h)
SO   = lua/multiprocessing/core.so
AUTH_SO = lua/multiprocessing/auth.so
REDIS_SO = lua/multiprocessing/redis.so
REDIS_SRC = csrc/redis/redis.c
LUASRC = $(wildcard lua/multiprocessing/*.lua)
CLUSTERSRC = $(wildcard lua/multiprocessing/cluster/*.lua)
BUSTED = $(LUA) /usr/bin/busted
ENV  = LUA_PATH="$(CURDIR)/lua/?.lua;$(CURDIR)/lua/?/init.lua;;" \
       LUA_CPATH="$(CURDIR)/lua/?.so;;"
DEPS = lua5.4 liblua5.4-dev lua-busted gcc make libssl-dev redis-server libhiredis-dev \
       lua-cqueues lua-luv lua-logging

.PHONY: embed all run run-cluster test test-asan examples bench chaos fuzz fuzz-ci lint install clean deps spec env

all: $(SO) $(AUTH_SO) $(REDIS_SO)

$(SO): $(CORE_SRC) $(HDR)
	$(CC) $(ALL_CFLAGS) $(LDFLAGS_SO) -o $@ $(CORE_SRC) $(LIBS)

$(AUTH_SO): csrc/auth.c $(HDR)
	$(CC) $(ALL_CFLAGS) $(LDFLAGS_SO) -o $@ csrc/auth.c $(AUTH_LIBS)

$(REDIS_SO): $(REDIS_SRC)
	$(CC) $(ALL_CFLAGS) $(LDFLAGS_SO) -o $@ $(REDIS_SRC) $(REDIS_LIBS)

# Install what is missing (Debian); does nothing when all is there.
deps:
	@missing=""; for p in $(DEPS); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

run: deps
	$(MAKE) all
	$(ENV) $(LUA) examples/primes_pool.lua $(N)

# The primes example across two worker "machines" (mp-worker processes,
# each in a session of its own) on a Redis started here on a Unix socket;
# prints which machine counted how many ranges, then stops them all.
run-cluster: deps
	$(MAKE) all
	@d=$$(mktemp -d); trap 'for f in $$d/*.pid; do [ -f $$f ] && /bin/kill -s INT -- -$$(cat $$f) 2>/dev/null; done; \
	  sleep 1; redis-cli -s $$d/s shutdown nosave >/dev/null 2>&1; rm -rf $$d' EXIT; \
	redis-server --port 0 --unixsocket $$d/s --dir $$d --save '' --appendonly no \
	  --daemonize yes --pidfile $$d/redis.pidfile --logfile $$d/log || exit 1; \
	head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > $$d/key; \
	for m in alpha beta; do \
	  MP_MACHINE=$$m $(ENV) setsid -f sh -c "echo \$$\$$ > $$d/$$m.pid; exec $(LUA) bin/mp-worker \
	    --redis unix://$$d/s --queue primes --processes 1 --authkey-file $$d/key --machine $$m"; \
	done; \
	MP_REDIS=unix://$$d/s MP_AUTHKEY=$$(cat $$d/key) $(ENV) $(LUA) examples/cluster/primes.lua $(N)

# The specs run twice: first against a build with AddressSanitizer and
# UndefinedBehaviorSanitizer (children too), then against the real build;
# the last line is the real build's "N passed, N failed".
test: deps
	$(MAKE) all embed test-asan
	$(ENV) timeout 1800 $(BUSTED) -o spec/summary.lua spec

ASAN_SO = build/asan/multiprocessing/core.so
ASAN_AUTH_SO = build/asan/multiprocessing/auth.so
ASAN_REDIS_SO = build/asan/multiprocessing/redis.so
ASAN_CFLAGS = -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer \
       $(WARN) -fPIC -fvisibility=hidden -I$(LUA_INCDIR) -Icsrc $(LDFLAGS_SO)
ASAN_ENV = LD_PRELOAD="$$($(CC) -print-file-name=libasan.so) $$($(CC) -print-file-name=libubsan.so)" \
       ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
       LUA_PATH="$(CURDIR)/lua/?.lua;$(CURDIR)/lua/?/init.lua;;" \
       LUA_CPATH="$(CURDIR)/build/asan/?.so;;"

$(ASAN_SO): $(CORE_SRC) $(HDR)
	@mkdir -p $(dir $@)
	$(CC) $(ASAN_CFLAGS) -o $@ $(CORE_SRC) $(LIBS)

$(ASAN_AUTH_SO): csrc/auth.c $(HDR)
	@mkdir -p $(dir $@)
	$(CC) $(ASAN_CFLAGS) -o $@ csrc/auth.c $(AUTH_LIBS)

$(ASAN_REDIS_SO): $(REDIS_SRC)
	@mkdir -p $(dir $@)
	$(CC) $(ASAN_CFLAGS) -o $@ $(REDIS_SRC) $(REDIS_LIBS)

test-asan: $(ASAN_SO) $(ASAN_AUTH_SO) $(ASAN_REDIS_SO)
	@echo "== specs under AddressSanitizer and UBSan"
	$(ASAN_ENV) timeout 1800 $(BUSTED) --cpath="$(CURDIR)/build/asan/?.so" -o spec/summary.lua spec

# Print the environment that makes the source tree requirable:
#   eval "$(make -s env)"
env:
	@echo 'export LUA_PATH="$(CURDIR)/lua/?.lua;$(CURDIR)/lua/?/init.lua;;"'
	@echo 'export LUA_CPATH="$(CURDIR)/lua/?.so;;"'

# A C host that embeds Lua and this library (examples/embed): spawned
# children are the host too (mp_child_main, multiprocessing.h).
EMBED = examples/embed/host
embed: $(EMBED)
$(EMBED): examples/embed/host.c $(SRC) $(HDR)
	$(CC) $(CFLAGS) $(WARN) -I$(LUA_INCDIR) -Icsrc -o $@ examples/embed/host.c $(SRC) \
	  -llua5.4 $(LIBS) $(AUTH_LIBS)

examples: deps all
	@for f in examples/*.lua; do echo "== $$f"; \
	  $(ENV) timeout 120 $(LUA) $$f || exit 1; done

# the Python side of each case, and the other peers, are Debian packages too
bench:
	$(MAKE) deps DEPS="$(DEPS) python3 lua-cjson python3-rq python3-celery python3-redis"
	$(MAKE) all
	$(ENV) $(LUA) bench/run.lua

# Fault and attack trials, not part of make test (docs/reliability.md):
#   make chaos [ROUNDS=x] [TRIALS=n | TRIALS=family=n,...] [ONLY=families]
#              [METHODS=fork,spawn,forkserver] [SEED=n]
# One table at the end; exits non-zero if any trial lost, duplicated, hung,
# crashed or leaked. The trials' stderr goes to build/chaos.log.
chaos:
	$(MAKE) deps DEPS="$(DEPS) lua-socket"
	$(MAKE) all
	$(ENV) CHAOS_ROUNDS="$(ROUNDS)" CHAOS_TRIALS="$(TRIALS)" CHAOS_ONLY="$(ONLY)" \
	  CHAOS_METHODS="$(METHODS)" CHAOS_SEED="$(SEED)" $(LUA) chaos/run.lua

install: all
	install -d $(DESTDIR)$(LUA_LIBDIR)/multiprocessing $(DESTDIR)$(LUA_SHAREDIR)/multiprocessing
	install -m 755 $(SO) $(DESTDIR)$(LUA_LIBDIR)/multiprocessing/core.so
	install -m 755 $(AUTH_SO) $(DESTDIR)$(LUA_LIBDIR)/multiprocessing/auth.so
	install -m 755 $(REDIS_SO) $(DESTDIR)$(LUA_LIBDIR)/multiprocessing/redis.so
	install -m 644 $(LUASRC) $(DESTDIR)$(LUA_SHAREDIR)/multiprocessing/
	install -d $(DESTDIR)$(LUA_SHAREDIR)/multiprocessing/cluster $(DESTDIR)$(PREFIX)/bin
	install -m 644 $(CLUSTERSRC) $(DESTDIR)$(LUA_SHAREDIR)/multiprocessing/cluster/
	install -m 755 bin/mp-worker $(DESTDIR)$(PREFIX)/bin/mp-worker
	install -d $(DESTDIR)$(LUA_SHAREDIR)/multiprocessing/managers
	install -m 644 lua/multiprocessing/managers/*.lua $(DESTDIR)$(LUA_SHAREDIR)/multiprocessing/managers/

lint:
	luacheck lua spec examples bench chaos
	cppcheck --quiet --enable=warning,performance,portability --error-exitcode=1 -I$(LUA_INCDIR) csrc

clean:
	rm -rf $(SO) $(AUTH_SO) $(REDIS_SO) build examples/embed/host

# Fuzz the codec's decoder with libFuzzer (clang, libclang-rt-*-dev):
#   make fuzz [FUZZ_SECONDS=600]   make fuzz-ci (60 s, for CI)
# Findings (crash-*, leak-*) and the grown corpus go to fuzz/out/.
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 600
FUZZ_LIBS    ?= -llua5.4 -lm
FUZZ_BIN      = fuzz/out/fuzz_decode

$(FUZZ_BIN): fuzz/fuzz_decode.c $(CORE_SRC) $(HDR)
	mkdir -p fuzz/out/corpus
	$(FUZZ_CC) -g -O1 -fsanitize=fuzzer,address,undefined \
	  -fno-sanitize-recover=undefined -I$(LUA_INCDIR) -Icsrc \
	  -o $@ fuzz/fuzz_decode.c $(CORE_SRC) $(FUZZ_LIBS)

fuzz: $(FUZZ_BIN)
	mkdir -p fuzz/out/corpus
	$(FUZZ_BIN) -max_total_time=$(FUZZ_SECONDS) -max_len=4096 -timeout=10 \
	  -rss_limit_mb=2048 -artifact_prefix=fuzz/out/ -print_final_stats=1 \
	  fuzz/out/corpus fuzz/corpus

fuzz-ci:
	$(MAKE) fuzz FUZZ_SECONDS=60
