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
	touch $@

install: $(STAMP)

demo: install
	@echo; echo "== orion profile: this machine, its tier and memory budget"
	$(BIN)/orion profile
	@echo; echo "== orion profile --ram 3GB --output -: the strategy a 3 GB device would get"
	$(BIN)/orion profile --ram 3GB --output - | sed -n '1,32p'
	@echo; echo "== orion strategy: the settings in force and where each comes from"
	ORION_MAX_MODELS=2 $(BIN)/orion strategy

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/startup.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
