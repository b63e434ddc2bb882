# `make demo` and `make test` each build .venv when it is missing; a fresh machine needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test fuzz bench bench-quick clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/peftc demo

# Two workers, one torch thread each: CI has 2 cores and the suite must stay under 10 minutes; worksteal keeps
# both busy to the end (a worker that runs out takes queued tests from the other).
test: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist worksteal

# The fuzz suite at depth: 1,000 examples per target (5 targets: 5,000), plus the SIGINT/SIGKILL fault runs at more kill
# points. `make test` runs the same tests with 100 examples each and 1 kill point per signal.
fuzz: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 FUZZ_EXAMPLES=1000 FAULT_KILLS=6 $(BIN)/python -m pytest -n 2 --dist worksteal \
		tests/test_fuzz.py tests/test_faults.py

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
