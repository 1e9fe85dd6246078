# inhouse: `make serve` and `make test` work on a fresh machine; every install step lives here.
# The venv is reused while the pinned requirement files are unchanged (a stamp named by their hash).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUNTIME_HASH := $(shell cat requirements.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -c1-16)
TEST_HASH    := $(shell cat requirements-test.txt | sha256sum | cut -c1-16)
BENCH_HASH   := $(shell cat requirements-bench.txt | sha256sum | cut -c1-16)
RUNTIME_STAMP := $(VENV)/.runtime-$(RUNTIME_HASH)
TEST_STAMP    := $(VENV)/.test-$(TEST_HASH)-$(RUNTIME_HASH)
BENCH_STAMP   := $(VENV)/.bench-$(BENCH_HASH)-$(TEST_HASH)-$(RUNTIME_HASH)
ARGS ?=

.PHONY: install serve test test-fast lint services bench clean

$(RUNTIME_STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@rm -f $(VENV)/.runtime-* $(VENV)/.test-* $(VENV)/.bench-*
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

$(TEST_STAMP): $(RUNTIME_STAMP)
	@rm -f $(VENV)/.test-*
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-test.txt -c requirements.txt
	@touch $@

$(BENCH_STAMP): $(TEST_STAMP)
	@rm -f $(VENV)/.bench-*
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-bench.txt -c requirements.txt
	@touch $@

install: $(RUNTIME_STAMP)

## Start the server on 127.0.0.1:8000 with the embedded SmolLM2-135M-Instruct (or: make serve ARGS="--model DIR")
serve: $(RUNTIME_STAMP)
	$(BIN)/inhouse serve $(ARGS)

## The whole suite, as CI runs it: lint + types, then every test
test: lint services
	$(BIN)/python -m pytest $(ARGS)

## PostgreSQL and Redis binaries for the storage tests (Debian packages; the tests start their own servers),
## promtool, and Chromium for the web console's browser tests
services:
	@bash scripts/services.sh

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

## Inner loop: everything except the slow end-to-end tests on the real SmolLM2 and Dify
test-fast: lint
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

## Benchmarks (bench/README.md); make bench ARGS="--smoke --only inhouse" proves it runs in seconds
bench: $(BENCH_STAMP)
	$(BIN)/python bench/engine.py $(ARGS)

clean:
	rm -rf $(VENV) .venv-dify .pytest_cache
