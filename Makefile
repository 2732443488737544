# make demo  - set up .venv from nothing and run the tour on the bundled data
# make test  - set up .venv from nothing and run the test suite
# make bench - run the benchmarks (ratios against PyTorch in the same run, noisy on a busy machine)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the CPU build 2.13.0 on this machine's disk, before anything can ask for another
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/batchnorm demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2

bench: $(STAMP)
	$(PY) benchmarks/bench_layers.py
	$(PY) benchmarks/bench_memory.py
	$(PY) benchmarks/bench_fold.py
	$(PY) benchmarks/bench_sync.py

clean:
	rm -rf $(VENV) build dist reports .pytest_cache .hypothesis
