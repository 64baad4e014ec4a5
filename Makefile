# Two entry points that work on a fresh machine with only Python 3.11+:
#   make train   create/reuse .venv, install mmfed, run the default federation, print its metrics
#   make test    create/reuse .venv, install mmfed[dev], run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: train test install lint

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel; anything unpinned would pull CUDA builds.
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/mmfed train $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check mmfed tests eval
