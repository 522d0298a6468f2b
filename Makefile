# Every target sets itself up: a fresh machine needs only python3 (>= 3.10) on PATH.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help install tools demo test test-all test-unit test-integration lint bench clean

help:
	@echo "make demo   - run the daemon end to end on an embedded broker with the digits set"
	@echo "make test   - install what the tests need and run them (all but those marked slow)"
	@echo "make test-all - every test, the slow ones too"
	@echo "make lint   - ruff and mypy"
	@echo "make bench  - throughput benchmark (prints JSON)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded,dev]'
	touch $(STAMP)

install: $(STAMP)

# promtool validates and unit-tests deploy/prometheus; Debian's prometheus package provides it.
tools:
	@command -v promtool >/dev/null 2>&1 || { \
	  echo "installing promtool (Debian package prometheus)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	}
	@promtool --version 2>&1 | head -n 1

demo: $(STAMP)
	$(BIN)/streamvi --config configs/demo.yaml demo

test: $(STAMP) tools
	$(BIN)/python -m pytest -m "not slow" tests

test-all: $(STAMP) tools
	$(BIN)/python -m pytest tests

test-unit: $(STAMP) tools
	$(BIN)/python -m pytest tests/unit

test-integration: $(STAMP)
	$(BIN)/python -m pytest tests/integration

lint: $(STAMP)
	$(BIN)/ruff check streamvi tests bench
	$(BIN)/ruff format --check streamvi tests bench
	$(BIN)/mypy streamvi

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
