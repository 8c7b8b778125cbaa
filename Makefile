# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint typecheck bench clean redis-server docs

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

test: lint typecheck docs redis-server
	$(BIN)/python -m pytest -q
	$(MAKE) test-frameworks

# The site goes to site/ (git-ignored). strict: any MkDocs or mkdocstrings warning fails it.
$(VENV)/.docs: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[docs]'
	touch $@

docs: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# Framework integration tests (LangChain, LangGraph, OpenAI Agents SDK, LiteLLM) in their
# own virtualenv: litellm must not sit next to MLflow in $(VENV) (MLflow's judges switch to it).
# RUNGUARD_FRAMEWORKS=1 turns a missing framework package into an error, not a skip.
.PHONY: test-frameworks
FW_VENV := .venv-frameworks
FW_BIN  := $(FW_VENV)/bin

$(FW_BIN)/python:
	$(PYTHON) -m venv $(FW_VENV)
	$(FW_BIN)/python -m pip install -q --upgrade pip

$(FW_VENV)/.frameworks: pyproject.toml | $(FW_BIN)/python
	$(FW_BIN)/pip install -q -e '.[frameworks-test]'
	touch $@

test-frameworks: $(FW_VENV)/.frameworks
	RUNGUARD_FRAMEWORKS=1 $(FW_BIN)/python -m pytest -q tests/frameworks

bench: $(VENV)/.dev
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/concurrency.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site
