# syntax=docker/dockerfile:1
# The image every KFP component of pipelines/ and every TorchX job runs in (DEFAULT_IMAGE in
# components/image.py), also usable alone for one stage:
#   docker build -t ghcr.io/kd-pipeline/kdp:0.1.0 .
#   docker run --gpus all ghcr.io/kd-pipeline/kdp:0.1.0 stage teacher --data gs://... --out gs://...
# Stage "build": the CUDA toolkit (nvcc) and the virtual environment with the project installed,
# and the CUDA kernels of kd_lib.ops compiled for A100 and H100/H200 (with PTX for later GPUs).
# Stage "runtime": the CUDA base image, the interpreter, that environment and the compiled
# kernels, run as a non-root user.

# The CUDA of the torch wheels (the cu130 index below): nvcc must have the same major version to
# build extensions that torch loads.
ARG CUDA_VERSION=13.0.2
ARG PYTHON_VERSION=3.11
ARG UV_VERSION=0.13

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu22.04 AS build
ARG PYTHON_VERSION
ARG TORCH_VERSION=2.14.*
ARG TORCHVISION_VERSION=0.29.*
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
# g++: the host compiler under nvcc; ninja: parallel extension builds (torch falls back to a slow
# serial build without it)
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ ninja-build \
    && rm -rf /var/lib/apt/lists/*
# Ubuntu 22.04 has Python 3.10: uv fetches a standalone CPython into /opt/python, a path the
# runtime stage copies unchanged (the venv's interpreter links point there)
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed
RUN uv venv --python ${PYTHON_VERSION} --seed /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, from PyTorch's index for the CUDA of nvcc above (PyPI's default build may target
# another); `pip install .` below then finds the pins satisfied and keeps these builds
RUN pip install --index-url ${TORCH_INDEX_URL} "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
# compute capabilities of A100 (8.0) and H100/H200 (9.0, with PTX that later GPUs compile when
# they load it): there is no GPU during the build to detect. KD_LIB_OPS_DIR: where
# `python -m kd_lib.ops.build` puts the kernels and where kd_lib.ops looks for them.
ENV TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" \
    KD_LIB_OPS_DIR=/opt/kd_lib_ops
WORKDIR /src
# pyproject names README.md as the package's long description: the build reads it
COPY pyproject.toml README.md ./
COPY kd_lib kd_lib
COPY components components
COPY pipelines pipelines
# --no-build-isolation: build with the venv's own setuptools (pyproject's build-system requires)
# instead of fetching a separate build environment
RUN pip install "setuptools>=69" \
    && pip install --no-build-isolation .
# the kernels, from the installed package (outside /src): the runtime stage has no compiler
RUN cd / && python -m kd_lib.ops.build

FROM nvidia/cuda:${CUDA_VERSION}-base-ubuntu22.04 AS runtime
# base, not runtime or cudnn-runtime: the torch wheels carry their own cuBLAS, cuDNN and NCCL
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/kd_lib_ops /opt/kd_lib_ops
# first on PATH: KFP runs its components with `python3 -m kfp.dsl.executor_main`, which must be
# the venv's interpreter
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    KD_LIB_OPS_DIR=/opt/kd_lib_ops
RUN useradd --create-home --uid 1000 kdp
USER kdp
# the project is installed in the venv, so `python -m components.<stage>` works from any folder;
# this one is writable for `kdp run`'s runs/ and caches
WORKDIR /home/kdp
# `docker run IMAGE stage teacher ...`; KFP sets its own command and skips this
ENTRYPOINT ["kdp"]
