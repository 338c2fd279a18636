# The two commands of the README's quickstart, and a few more.
PY := .venv/bin/python

.PHONY: setup run test test-all lint bench
setup:            ## create .venv and install forge with its dev dependencies
	@bash scripts/setup.sh

run: setup        ## train the default experiment on an embedded local Ray (CPU)
	$(PY) -m forge $(ARGS)

test: setup       ## the default test suite (what CI runs): unit + integration, no slow/gpu
	$(PY) -m pytest $(ARGS)

test-all: setup   ## also the slow tests
	$(PY) -m pytest -m "not gpu" $(ARGS)

lint: setup
	$(PY) -m ruff check forge recipes tests scripts
	$(PY) -m ruff format --check forge recipes tests scripts

bench: setup      ## forge vs a bare Ray TorchTrainer loop (prints the ratio)
	$(PY) scripts/bench/ddp_overhead.py --steps 300 --repeats 3
