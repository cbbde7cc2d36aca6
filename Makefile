# A thin wrapper over Meson and Ninja; see README.md.
#   make demo     install what is missing, build, run the demo
#   make check    install what is missing, build, run every test
#   make format   apply .clang-format to the C sources
#   make install  the programs, libstrata.so.0, headers, strata.pc and man
#                 pages into PREFIX (default /usr/local), under DESTDIR
#   make uninstall  remove what the last make install installed
BUILD ?= build
MESON_ARGS ?=
PREFIX ?= /usr/local
DESTDIR ?=

.PHONY: all deps build check demo format clean install uninstall

all: build

deps:
	@scripts/deps.sh

build: deps
	@if [ ! -f $(BUILD)/build.ninja ]; then \
	  meson setup $(BUILD) $(MESON_ARGS); \
	elif [ -n "$(MESON_ARGS)" ]; then \
	  meson configure $(BUILD) $(MESON_ARGS); \
	fi
	@ninja -C $(BUILD)

# The build directory is configured for PREFIX first (meson rebuilds only
# what names the prefix: strata.pc), then meson installs into
# DESTDIR/PREFIX and records every file in meson-logs/install-log.txt,
# which uninstall reads (the paths there include DESTDIR).
install: build
	@if [ "$$(meson introspect $(BUILD) --buildoptions | \
	      python3 -c 'import json,sys; print(next(o["value"] for o in json.load(sys.stdin) if o["name"] == "prefix"))')" \
	      != "$(PREFIX)" ]; then \
	  meson configure $(BUILD) -Dprefix=$(PREFIX); \
	fi
	@meson install -C $(BUILD) $(if $(DESTDIR),--destdir $(abspath $(DESTDIR)))

uninstall:
	@ninja -C $(BUILD) uninstall

check: build
	@scripts/run-tests.sh $(BUILD)

demo: build
	@scripts/demo.sh $(BUILD)

format:
	@clang-format -i $$(git ls-files '*.c' '*.h')

clean:
	rm -rf $(BUILD)
