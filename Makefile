# make demo  - set up .venv from nothing and run the tour on the bundled data
# make test  - set up .venv from nothing and run the test suite
# make test-fast - the quick subset for the inner loop (under a minute once the kernels are cached)
# make test-newest - the quick subset again in .venv-newest, on the newest torch this machine has
# make lint  - ruff over the sources, tests, benchmarks and examples (CI runs it)
# make bench - run the benchmarks (ratios against PyTorch in the same run, noisy on a busy machine)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-newest lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the CPU build 2.13.0 on this machine's disk, before anything can ask for another
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Compile the CPU kernels once, ahead (numba caches them on disk): the tests then load every
# kernel instead of each test worker compiling its own copy, and no demo step waits. Cases
# already cached load in about a second. numba checks only the file that defines a kernel, not
# the helpers it inlines from the other kernel files, so a changed kernel source clears the
# whole cache first: no kernel keeps an old helper's code.
WARM := $(VENV)/.warm
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
KERNEL_CACHE := src/batchnorm/kernels/__pycache__
$(WARM): $(STAMP) $(wildcard src/batchnorm/kernels/*.py)
	if [ -f $(WARM) ]; then rm -f $(KERNEL_CACHE)/*.nbi $(KERNEL_CACHE)/*.nbc; fi
	$(VENV)/bin/batchnorm warmup --dtype all --jobs $(JOBS)
	touch $(WARM)

demo: $(STAMP)
	$(VENV)/bin/batchnorm warmup --layout nchw --act identity relu --jobs $(JOBS)
	$(VENV)/bin/batchnorm demo

# --dist loadgroup: a module marked xdist_group (the tour) stays on one worker
test: $(WARM)
	$(PY) -m pytest -q -n 2 --dist loadgroup

# no process groups, no tour, no ONNX: the modules that run in seconds
FAST := tests/test_reference.py tests/test_activations.py tests/test_structure.py \
	tests/test_frozen.py tests/test_graph.py tests/test_conversion.py tests/test_fold.py \
	tests/test_inspect.py tests/test_opcheck.py
test-fast: $(WARM)
	$(PY) -m pytest -q -n 2 --dist loadgroup $(FAST)

# The package takes the torch its user has (no upper bound): a second venv with the newest torch
# here (the CUDA build, which imports without a GPU) proves it. Installing the package must leave
# that torch in place; then the layers, options and compile paths run on it.
NEWEST_TORCH ?= 2.14.1
NEWEST := .venv-newest
$(NEWEST)/.installed: pyproject.toml
	$(PYTHON) -m venv $(NEWEST)
	$(NEWEST)/bin/python -m pip install -q --upgrade pip
	$(NEWEST)/bin/python -m pip install -q torch==$(NEWEST_TORCH)
	$(NEWEST)/bin/python -m pip install -q -e '.[test]'
	$(NEWEST)/bin/python -c "import torch; print(torch.__version__)" | grep -q '^$(NEWEST_TORCH)' \
		|| { echo "installing the package replaced torch $(NEWEST_TORCH)"; exit 1; }
	touch $@

test-newest: $(NEWEST)/.installed
	$(NEWEST)/bin/batchnorm warmup --dtype all --jobs $(JOBS)
	$(NEWEST)/bin/python -m pytest -q -n 2 --dist loadgroup $(FAST) tests/test_layers.py \
		tests/test_variants.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples

bench: $(STAMP)
	$(PY) benchmarks/bench_layers.py
	$(PY) benchmarks/bench_memory.py
	$(PY) benchmarks/bench_fold.py
	$(PY) benchmarks/bench_sync.py
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf $(VENV) $(NEWEST) build dist reports .pytest_cache .hypothesis
