# A thin wrapper over Meson and Ninja; see README.md.
#   make demo     install what is missing, build, run the demo
#   make check    install what is missing, build, run every test
#   make format   apply .clang-format to the C sources
BUILD ?= build
MESON_ARGS ?=

.PHONY: all deps build check demo format clean

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

check: build
	@scripts/run-tests.sh $(BUILD)

demo: build
	@scripts/demo.sh $(BUILD)

format:
	@clang-format -i $$(git ls-files '*.c' '*.h')

clean:
	rm -rf $(BUILD)
