# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint typecheck bench clean redis-server

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The demo needs the SDK it drives, nothing else.
$(VENV)/.demo: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[openai]'
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.demo

demo: $(VENV)/.demo
	$(BIN)/runguard demo

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks

typecheck: $(VENV)/.dev
	$(BIN)/mypy

# The shared-budget tests start their own redis-server (tests/conftest.py) on a free
# loopback port and stop it afterwards; this only makes sure Debian's binary is here.
redis-server:
	@command -v redis-server >/dev/null || { \
	  apt-get install -y -qq redis-server >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq redis-server; }; }

test: lint typecheck redis-server
	$(BIN)/python -m pytest -q

bench: $(VENV)/.dev
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/concurrency.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
