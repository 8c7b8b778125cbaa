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
	$(MAKE) test-matrix

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

# The provider tests against supported SDKs (docs/sdk-versions.md): the oldest, the first
# with a per-attempt method (RunGuard hooks them differently), and the newest, each pair in
# its own virtualenv with runguard and no dev extras. A stamp per venv keeps re-runs to the
# tests alone; changing a pin (or pyproject.toml) reinstalls that venv.
# Do not run two of these at once in one checkout: they share .venv-matrix/.
.PHONY: test-matrix
MATRIX_DIR       := .venv-matrix
MATRIX_LEGS      := oldest boundary newest
# openai before 1.55.3 builds its default client with an argument httpx 0.28 removed
MATRIX_OLDEST    := openai==1.10.0 anthropic==0.40.0 'httpx<0.28'
MATRIX_BOUNDARY  := openai==2.31.0 anthropic==0.108.0
MATRIX_NEWEST    := openai==3.57.0 anthropic==2.15.0
MATRIX_TOOLS     := 'pytest>=8' 'pytest-asyncio>=0.23' 'pytest-timeout>=2.3' 'hypothesis>=6.100'
MATRIX_TESTS     := tests/test_openai.py tests/test_anthropic.py tests/test_streams.py \
                    tests/test_rate_limits.py tests/test_latency.py tests/test_loops.py \
                    tests/test_context_guard.py tests/test_concurrency.py tests/test_guard.py \
                    tests/test_sdk_hooks.py tests/test_benchmarks.py

matrix_pins = $(MATRIX_$(shell echo $(1) | tr a-z A-Z)) $(MATRIX_TOOLS)

# rewritten only when the pins change, so edits elsewhere in this file keep the venvs
$(MATRIX_DIR)/%.pins: FORCE
	@mkdir -p $(@D)
	@echo "$(call matrix_pins,$*)" | cmp -s - $@ || echo "$(call matrix_pins,$*)" > $@

$(MATRIX_DIR)/%/.stamp: pyproject.toml $(MATRIX_DIR)/%.pins
	rm -rf $(MATRIX_DIR)/$*
	$(PYTHON) -m venv $(MATRIX_DIR)/$*
	$(MATRIX_DIR)/$*/bin/pip install -q --disable-pip-version-check -e . $(call matrix_pins,$*)
	touch $@

.PHONY: FORCE
.PRECIOUS: $(MATRIX_DIR)/%.pins
FORCE:

test-matrix: $(foreach leg,$(MATRIX_LEGS),$(MATRIX_DIR)/$(leg)/.stamp)
	@for name in $(MATRIX_LEGS); do \
	  echo "== test-matrix $$name: $$($(MATRIX_DIR)/$$name/bin/pip list 2>/dev/null \
	    | grep -E '^(openai|anthropic) ' | tr -s ' ' | paste -sd ' ')"; \
	  $(MATRIX_DIR)/$$name/bin/python -m pytest -q -p no:cacheprovider $(MATRIX_TESTS) || exit 1; \
	done
