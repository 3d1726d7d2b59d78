# zar's two commands: `make demo` (the whole study on the embedded digits) and `make test`.
# Both set up .venv from nothing on the first call.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU machines here carry these two releases on disk; any torch 2.7+ works.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-slow test-all lint format demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

test: install
	$(BIN)/python -m pytest

test-slow: install
	$(BIN)/python -m pytest -m slow

test-all: install
	$(BIN)/python -m pytest -m ''

lint: install
	$(BIN)/ruff check zar tests benchmarks scripts
	$(BIN)/ruff format --check zar tests benchmarks scripts

format: install
	$(BIN)/ruff format zar tests benchmarks scripts

# Two children at a time, one thread each: on 2 cores that beats one two-thread process.
demo: install
	$(BIN)/zar study --jobs 2

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
