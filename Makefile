# Set-up and entry points. `make demo` and `make test` work on a fresh machine:
# they create .venv with Python 3.11 and install the project into it.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kdp run

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# on a CUDA machine: build the kernels, run the GPU tests and the GPU benchmarks (bench/gpu.sh)
gpu-check: $(STAMP)
	bash bench/gpu.sh

clean:
	rm -rf runs .pytest_cache
