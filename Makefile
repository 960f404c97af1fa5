# The project's front door: `make demo` and `make test` do all set-up themselves.
#   make test                       the test suite under python3, on the C kernel (built here)
#   make test PYTHON=/path/to/py    the same under another interpreter (e.g. free-threaded 3.13t)
#   QSBR_PURE_PYTHON=1 make test    the same on the pure-Python kernel
#   make test STRICT=0              allow a machine without a C compiler (pure-Python kernel)
#   make demo                       a 10-second hot-swap under load (live view)
#   make demo ARGS=--stall          the same with a stuck reader, a byte cap and stall detection
#   make bench                      the benchmarks (writes benchmarks/results/*.json)
#   make lint                       ruff and mypy --strict
#   make verify                     spin model check of the protocol, and its mutants (verify/)
#   make sanitize                   the C kernel under AddressSanitizer and UBSan: stress, torture
#                                   (short) and structures tests
#   make torture SECONDS=300        the rcutorture-style test, longer than CI runs it
#   make loop RUNS=200              the interleaving tests RUNS times in a row, stopping at a failure
#                                   (TESTS=tests/test_x.py to loop other concurrency tests)
PYTHON ?= python3
# One virtual environment per interpreter build, e.g. .venv/cpython-311 and .venv/cpython-313t.
TAG := $(shell $(PYTHON) -c "import sys, sysconfig; print(sys.implementation.cache_tag + ('t' if sysconfig.get_config_var('Py_GIL_DISABLED') else ''))")
VENV ?= .venv/$(TAG)
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SECONDS ?= 10

.PHONY: test demo bench lint verify torture loop sanitize clean

$(VPY):
	$(PYTHON) -m venv $(VENV)

# The C kernel is built by the editable install (setup.py). STRICT=1 (the
# default) builds it with -Wall -Wextra -Werror and fails when it cannot be
# built, rather than falling back to the pure-Python kernel in silence.
STRICT ?= 1
KERNEL_SOURCES := setup.py src/qsbr/_kernel.c src/qsbr/_shared.c
$(STAMP): pyproject.toml $(KERNEL_SOURCES) | $(VPY)
	$(VPY) -m pip install --quiet --upgrade pip
	QSBR_STRICT_BUILD=$(STRICT) $(VPY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Which kernel the run must be on: tests/test_kernel.py fails otherwise.
EXPECT_KERNEL := $(if $(filter-out 0,$(QSBR_PURE_PYTHON)),python,$(if $(filter 1,$(STRICT)),native,))
test: $(STAMP)
	@$(VPY) -c "import qsbr, sys; print('qsbr kernel:', qsbr.implementation, '-', sys.version.split()[0], 'GIL' if getattr(sys, '_is_gil_enabled', lambda: True)() else 'free-threaded')"
	QSBR_EXPECT_KERNEL=$(EXPECT_KERNEL) $(VPY) -m pytest -q

# The live view needs rich (the [live] extra); the demo falls back to plain lines without it.
demo: $(STAMP)
	$(VPY) -m pip install --quiet -e '.[live]' || echo "rich cannot be installed for this interpreter: plain output"
	$(VPY) -m qsbr demo --seconds $(SECONDS) $(ARGS)

WHEELS ?= ../shared/wheels
bench: $(STAMP)
	$(VPY) -m pip install --quiet -e '.[plot]' || echo "matplotlib cannot be installed for this interpreter: JSON only, no plot"
	$(VPY) -m pip install --quiet -e '.[peers]' || echo "a peer (readerwriterlock, UltraDict, shared-memory-dict) cannot be installed: the bench skips it"
	$(VPY) -m pip install --quiet --find-links $(WHEELS) cereggii ft_utils 2>/dev/null || echo "cereggii/ft_utils have no wheel for this interpreter: bench peers skips them"
	$(VPY) -m qsbr bench

lint: $(STAMP)
	$(VPY) -m pip install --quiet -e '.[lint]'
	$(VPY) -m ruff check src tests benchmarks examples
	$(VPY) -m ruff format --check src tests benchmarks examples
	$(VPY) -m mypy

torture: $(STAMP)
	QSBR_TORTURE_SECONDS=$(SECONDS) $(VPY) -m pytest -q tests/test_torture.py -k bound

RUNS ?= 200
TESTS ?= tests/test_interleave.py
loop: $(STAMP)
	@start=$$(date +%s); \
	for i in $$(seq 1 $(RUNS)); do \
	  $(VPY) -m pytest -q -p no:cacheprovider $(TESTS) > $(VENV)/loop.log 2>&1 \
	    || { cat $(VENV)/loop.log; echo "loop: run $$i of $(RUNS) FAILED after $$(( $$(date +%s) - start )) s"; exit 1; }; \
	done; \
	echo "loop: $(RUNS) runs of $(TESTS) passed in a row in $$(( $$(date +%s) - start )) s ($(TAG))"

verify:
	@command -v spin >/dev/null 2>&1 || { \
	  echo "installing spin (Debian package spin)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq spin; } >/dev/null \
	  || { echo "could not install spin: install the Debian package 'spin' (as root) and retry"; exit 1; }; }
	bash verify/run.sh

# The C kernel built with AddressSanitizer and UBSan into build/sanitize (a
# copy of the package that PYTHONPATH puts first), run with the runtimes
# preloaded and Python's allocator off (with the GIL; free-threaded builds
# keep mimalloc), so ASan sees every object. Leaks are
# checked by tests/test_kernel.py (reference counts, tracemalloc), not by
# LeakSanitizer, which reports the interpreter's own allocations at exit.
SANITIZE_TESTS ?= tests/test_kernel.py tests/test_stress.py tests/test_torture.py tests/test_cell.py \
	tests/test_shared_array.py tests/test_buffer_pool.py tests/test_sections.py tests/test_handle.py \
	tests/test_threads.py tests/test_release.py tests/test_pool_core.py tests/test_shared_domain.py \
	tests/test_shared_cell.py
# Free-threaded builds allocate objects with mimalloc only (no PYTHONMALLOC=malloc).
SANITIZE_MALLOC := $(if $(filter %t,$(TAG)),,PYTHONMALLOC=malloc)
SANITIZE_RUNTIMES = $$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)
sanitize: $(STAMP)
	rm -rf build/sanitize build/sanitize-tmp
	mkdir -p build/sanitize
	cp -r src/qsbr build/sanitize/qsbr
	rm -f build/sanitize/qsbr/*.so
	$(VPY) -m pip install --quiet 'setuptools>=77'
	QSBR_SANITIZE=1 QSBR_STRICT_BUILD=1 $(VPY) setup.py --quiet build_ext --build-lib build/sanitize --build-temp build/sanitize-tmp
	LD_PRELOAD="$(SANITIZE_RUNTIMES)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 $(SANITIZE_MALLOC) PYTHONPATH=build/sanitize \
	  QSBR_EXPECT_KERNEL=native QSBR_TORTURE_SECONDS=3 $(VPY) -c \
	  "import qsbr, sys; assert 'build/sanitize' in qsbr.__file__ and qsbr.implementation == 'native', qsbr.__file__; print('sanitized kernel:', qsbr.kernel.__file__)"
	LD_PRELOAD="$(SANITIZE_RUNTIMES)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 $(SANITIZE_MALLOC) PYTHONPATH=build/sanitize \
	  QSBR_EXPECT_KERNEL=native QSBR_TORTURE_SECONDS=3 $(VPY) -m pytest -q -p no:cacheprovider $(SANITIZE_TESTS)

clean:
	rm -rf .venv build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache src/qsbr/*.so
