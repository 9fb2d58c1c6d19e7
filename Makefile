# nodemesh: the two commands a user needs are `make demo` and `make test`.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python

.PHONY: setup test unit lint demo bench fuzz clean

setup:
	@scripts/setup.sh

# Two pytest processes, a test file each at a time: the lab tests mostly wait (agents, clients,
# timeouts), so the suite takes about two thirds of the time it takes in one process.
test: setup lint
	$(PY) -m pytest -q -n 2 --dist loadfile tests

unit: setup
	$(PY) -m pytest -q -m "not root" tests

lint: setup
	$(VENV)/bin/ruff check agent tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

demo: setup
	$(PY) -m agent.lab.demo $(if $(KEEP),--keep,)

# Benchmarks (bench/README.md): the full run (< 15 min) updates bench/RESULTS.md; QUICK=1 (< 2 min).
bench: setup
	$(PY) -m bench $(if $(QUICK),--quick,)

# The hypothesis campaigns (tests marked fuzz) with many more examples than `make test` runs.
FUZZ_EXAMPLES ?= 20000
fuzz: setup
	NODEMESH_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -m fuzz tests

clean:
	-$(VENV)/bin/nodemesh lab down 2>/dev/null
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
