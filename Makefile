# The project's front door: `make demo` and `make test` do all set-up themselves.
#   make test                       the test suite under python3
#   make test PYTHON=/path/to/py    the same under another interpreter (e.g. free-threaded 3.13t)
#   make demo                       a 10-second hot-swap under load (live view)
#   make demo ARGS=--stall          the same with a stuck reader, a byte cap and stall detection
#   make bench                      the benchmarks (writes benchmarks/results/*.json)
#   make lint                       ruff and mypy --strict
#   make verify                     spin model check of the protocol, and its mutants (verify/)
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

.PHONY: test demo bench lint verify torture loop clean

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VPY)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest -q

# The live view needs rich (the [live] extra); the demo falls back to plain lines without it.
demo: $(STAMP)
	$(VPY) -m pip install --quiet -e '.[live]' || echo "rich cannot be installed for this interpreter: plain output"
	$(VPY) -m qsbr demo --seconds $(SECONDS) $(ARGS)

WHEELS ?= ../shared/wheels
bench: $(STAMP)
	$(VPY) -m pip install --quiet -e '.[plot]' || echo "matplotlib cannot be installed for this interpreter: JSON only, no plot"
	$(VPY) -m pip install --quiet -e '.[peers]' || echo "readerwriterlock cannot be installed: bench peers skips it"
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

clean:
	rm -rf .venv build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
