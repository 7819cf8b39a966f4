# Two commands from a fresh machine: `make demo` (the main job) and `make test`.
PY ?= .venv/bin/python
STAMP := .venv/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
BENCH_ARGS ?=

.PHONY: setup data demo test test-slow bench lint clean-cache

setup: $(STAMP) data

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -e ".[dev,export,ray]"
	@rm -f .venv/.installed-*; touch $(STAMP)

data:
	@bash scripts/install_data.sh

demo: setup
	$(PY) -m baselines.experiments.demo

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) -m baselines.experiments.speed $(BENCH_ARGS)

lint: setup
	$(PY) -m ruff check envs agents baselines tests
