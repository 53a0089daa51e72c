# multiprocessing for Lua 5.4
#   make            build multiprocessing/core.so into lua/
#   make run        set up, build and run the flagship example
#   make test       set up, build and run the specs (last line: N passed, N failed)
#   make examples   run every example
#   make bench      benchmarks, side by side with Python's multiprocessing
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

SRC  = $(wildcard csrc/*.c)
HDR  = $(wildcard csrc/*.h)
SO   = lua/multiprocessing/core.so
LUASRC = $(wildcard lua/multiprocessing/*.lua)
BUSTED = $(LUA) /usr/bin/busted
ENV  = LUA_PATH="$(CURDIR)/lua/?.lua;$(CURDIR)/lua/?/init.lua;;" \
       LUA_CPATH="$(CURDIR)/lua/?.so;;"
DEPS = lua5.4 liblua5.4-dev lua-busted gcc make

.PHONY: all run test examples bench fuzz lint install clean deps spec env

all: $(SO)

$(SO): $(SRC) $(HDR)
	$(CC) $(ALL_CFLAGS) $(LDFLAGS_SO) -o $@ $(SRC) $(LIBS)

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
	$(ENV) $(LUA) examples/primes.lua

test: deps
	$(MAKE) all
	$(ENV) $(BUSTED) -o spec/summary.lua spec

# Print the environment that makes the source tree requirable:
#   eval "$(make -s env)"
env:
	@echo 'export LUA_PATH="$(CURDIR)/lua/?.lua;$(CURDIR)/lua/?/init.lua;;"'
	@echo 'export LUA_CPATH="$(CURDIR)/lua/?.so;;"'

examples: all
	@for f in examples/*.lua; do echo "== $$f"; \
	  $(ENV) timeout 120 $(LUA) $$f || exit 1; done

bench: all
	$(ENV) $(LUA) bench/run.lua

install: all
	install -d $(DESTDIR)$(LUA_LIBDIR)/multiprocessing $(DESTDIR)$(LUA_SHAREDIR)/multiprocessing
	install -m 755 $(SO) $(DESTDIR)$(LUA_LIBDIR)/multiprocessing/core.so
	install -m 644 $(LUASRC) $(DESTDIR)$(LUA_SHAREDIR)/multiprocessing/

lint:
	luacheck lua spec examples bench
	cppcheck --quiet --enable=warning,performance,portability --error-exitcode=1 -I$(LUA_INCDIR) csrc

clean:
	rm -f $(SO)
