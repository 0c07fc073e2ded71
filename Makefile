# Two commands do all set-up on a fresh machine: `make train` and `make test`.
# The install is idempotent: a stamp keyed on pyproject.toml's hash skips it when done.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml scripts/install.sh 2>/dev/null | sha256sum | cut -c1-16)
ARGS ?=

.PHONY: install train test lint clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	@PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/install.sh
	@rm -f $(VENV)/.installed-*
	@touch $@

train: install
	$(BIN)/async-rl train $(ARGS)

test: install
	$(BIN)/python -m pytest $(ARGS)

lint: install
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)
