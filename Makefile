# The two README commands: `make demo` (main job) and `make test` (test suite).
# Both create/refresh .venv/ first and are safe to re-run.
PY := .venv/bin/python

.PHONY: setup demo test test-all lint flops

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) train.py --config configs/demo.yaml --workdir runs/demo

test: setup
	$(PY) -m pytest -q -n 2 -m "not slow"

test-all: setup
	$(PY) -m pytest -q -n 2

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
