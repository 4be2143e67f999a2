# The README's first two commands: `make run` and `make test` do all the set-up themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test coverage lint bench fuzz clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: $(STAMP)
	mkdir -p var/run var/lib
	$(BIN)/auditd run --config config/dev.toml

# ruff and mypy --strict first (lint), then pytest. pytest's exit 5 (no tests collected)
# fails the target like any other non-zero code.
# Three workers, a test file each at a time (module fixtures stay whole): most tests
# wait on a daemon subprocess, so on the 2-core CI machine three keep both cores busy.
# Not more: the tests' deadlines are sized for that contention. PYTEST_WORKERS= runs it
# serially.
PYTEST_WORKERS ?= -n 3 --dist loadfile
test: $(STAMP) lint
	$(BIN)/pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

# The same suite under line coverage of auditd/ (daemon subprocesses included), failing
# under 85%. Not part of `make test`: tracing every process made the suite half as slow
# again (3 workers on 2 cores: 665 s against 449 s without), past CI's ten minutes.
coverage: $(STAMP) lint
	rm -rf .coverage-data && mkdir -p .coverage-data
	$(BIN)/coverage run -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)
	$(BIN)/coverage combine -q
	$(BIN)/coverage report --fail-under=85

lint: $(STAMP)
	$(BIN)/ruff check auditd tests
	$(BIN)/mypy auditd

bench: $(STAMP)
	$(BIN)/auditd bench --baseline

# The long fuzz campaign: tests/fuzz with many more examples (the default run keeps them
# few, so `make test` stays quick). FUZZ_ARGS passes pytest options, e.g. -x.
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=long $(BIN)/pytest tests/fuzz -p no:cacheprovider --timeout=0 $(FUZZ_ARGS)

clean:
	rm -rf $(VENV) var .coverage-data
