# Set-up and entry points. `make demo` and `make test` work on a fresh machine:
# they create .venv with Python 3.11 and install the project into it.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast docs gpu-check lock clean

# every dependency, pinned with its hashes (requirements/*.lock, made by `make lock`), then the
# project itself
$(STAMP): pyproject.toml requirements/dev.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements/dev.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kdp run

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# the documentation site (docs/, mkdocs.yml) into site/; a broken link or a missing page fails it
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

# on a CUDA machine: build the kernels, run the GPU tests and the GPU benchmarks (bench/gpu.sh)
gpu-check: $(STAMP)
	bash bench/gpu.sh

# the two container images (containers/build.sh), from the locked wheels that `make wheelhouse`
# downloads with this machine's pip (its index, proxy and certificates); WHEELHOUSE= (empty) makes
# the build download them from PyPI itself
WHEELHOUSE ?= wheelhouse
images: $(if $(WHEELHOUSE),wheelhouse)
	WHEELHOUSE=$(WHEELHOUSE) bash containers/build.sh

# the locked wheels of the images
wheelhouse: requirements/kernels.lock
	$(PYTHON) -m pip download --quiet --require-hashes --no-deps -r requirements/kernels.lock -d wheelhouse
	$(PYTHON) -m pip download --quiet --no-deps -d wheelhouse 'setuptools>=69' wheel

# the container tests: every stage in its image, the pipeline with each task in its container
test-containers: $(STAMP)
	$(BIN)/python -m pytest -m containers -n 0

# refresh the lock files from pyproject.toml, for Linux x86_64 and Python 3.11: run.lock (the
# images), kernels.lock (the train image's build stage) and dev.lock (tests and docs), the last
# two holding run.lock's versions
LOCK = $(BIN)/uv pip compile pyproject.toml --quiet --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --no-header --native-tls
lock: $(STAMP)
	$(BIN)/python -m pip install --quiet 'uv==0.13.*'
	$(LOCK) -o requirements/run.lock
	$(LOCK) --extra kernels -c requirements/run.lock -o requirements/kernels.lock
	$(LOCK) --extra test -c requirements/run.lock -o requirements/dev.lock

clean:
	rm -rf runs .pytest_cache
