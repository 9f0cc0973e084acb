# The two README commands: `make demo` (main job) and `make test` (test suite).
# Both create/refresh .venv/ first and are safe to re-run.
PY := .venv/bin/python
# glibc >= 2.35 on Linux: back large allocations with transparent huge pages. XLA:CPU allocates a
# step's buffers afresh on every call, and faulting them in 4 KiB pages was most of a CPU step
# (bench/RESULTS.md, "CPU step"). Ignored elsewhere; an existing GLIBC_TUNABLES is kept.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

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
