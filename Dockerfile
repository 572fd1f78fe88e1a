# syntax=docker/dockerfile:1
# One image per role, each a target of this file (the roles of components/image.py):
#   train  the training tasks and every TorchX job: CUDA, torch's CUDA build, the kd_lib.ops
#          kernels built for A100 and H100/H200 (with PTX for later GPUs)
#   cpu    source-version, prepare-data, evaluate and export: torch's CPU build, onnxruntime,
#          no CUDA (containers/cpu/)
#   docker build --target train -t ghcr.io/kd-pipeline/kdp:0.1.0 .
#   docker build --target cpu -t ghcr.io/kd-pipeline/kdp-cpu:0.1.0 .
#   docker run --gpus all ghcr.io/kd-pipeline/kdp:0.1.0 stage teacher --data gs://... --out gs://...
# Without --target, docker builds the last target, train. Both install the project the same way
# (the "source" stage below) into /opt/venv, run as a non-root user, and their entrypoint is kdp.
#
# Every base image is pinned by tag. To pin one by digest as well, append the digest to the tag
# of its FROM line (`FROM nvidia/cuda:${CUDA_VERSION}-base-ubuntu22.04@sha256:<digest>`; `docker
# buildx imagetools inspect IMAGE:TAG` prints it): Docker then checks the tag still names it.

# The CUDA of the torch wheels (the cu130 index below): nvcc must have the same major version to
# build extensions that torch loads.
ARG CUDA_VERSION=13.0.2
ARG PYTHON_VERSION=3.11
# the cpu image's Debian, glibc 2.36: the manylinux_2_28 wheels of pyarrow, onnxruntime and
# faster-coco-eval need 2.28 or later
ARG DEBIAN_RELEASE=bookworm
ARG UV_VERSION=0.13
# pyproject's pins of torch, installed in each image from PyTorch's index of that image's build
ARG TORCH_VERSION=2.14.*
ARG TORCHVISION_VERSION=0.29.*

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# The project's sources, which both images install
FROM scratch AS source
# pyproject names README.md as the package's long description: the build reads it
COPY pyproject.toml README.md /src/
COPY kd_lib /src/kd_lib
COPY components /src/components
COPY pipelines /src/pipelines

# ---- cpu ----

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS cpu-build
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
# torch's CPU build: no CUDA libraries in the image
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, from PyTorch's CPU index; `pip install` of the project then finds its pins
# satisfied (2.14.0+cpu is a 2.14.*) and keeps these builds
RUN pip install --index-url ${TORCH_CPU_INDEX_URL} "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
COPY containers/cpu/requirements.txt /tmp/cpu-requirements.txt
RUN pip install -r /tmp/cpu-requirements.txt
COPY --from=source /src /src
# --no-build-isolation: build with the venv's own setuptools (pyproject's build-system requires)
# instead of fetching a separate build environment
RUN pip install "setuptools>=69" \
    && pip install --no-build-isolation /src

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS cpu
# the venv's interpreter links point to the base image's /usr/local/bin/python, the same here
COPY --from=cpu-build /opt/venv /opt/venv
# first on PATH: KFP runs its components with `python3 -m kfp.dsl.executor_main`, which must be
# the venv's interpreter. KD_LIB_DISABLE_CUDA_OPS: the kd_lib.ops references, nothing to build.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    KD_LIB_DISABLE_CUDA_OPS=1
RUN useradd --create-home --uid 1000 kdp
USER kdp
# the project is installed in the venv, so `python -m components.<stage>` works from any folder;
# this one is writable for `kdp run`'s runs/ and caches
WORKDIR /home/kdp
# `docker run IMAGE stage evaluate ...`; KFP sets its own command and skips this
ENTRYPOINT ["kdp"]

# ---- train ----

# The CUDA toolkit (nvcc) and the virtual environment with the project installed, and the CUDA
# kernels of kd_lib.ops compiled for A100 and H100/H200 (with PTX for later GPUs)
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu22.04 AS train-build
ARG PYTHON_VERSION
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
ARG TORCH_CUDA_INDEX_URL=https://download.pytorch.org/whl/cu130
# g++: the host compiler under nvcc; ninja: parallel extension builds (torch falls back to a slow
# serial build without it)
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ ninja-build \
    && rm -rf /var/lib/apt/lists/*
# Ubuntu 22.04 has Python 3.10: uv fetches a standalone CPython into /opt/python, a path the
# train stage copies unchanged (the venv's interpreter links point there)
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed
RUN uv venv --python ${PYTHON_VERSION} --seed /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, from PyTorch's index for the CUDA of nvcc above (PyPI's default build may target
# another); `pip install` of the project then finds the pins satisfied and keeps these builds
RUN pip install --index-url ${TORCH_CUDA_INDEX_URL} "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
# compute capabilities of A100 (8.0) and H100/H200 (9.0, with PTX that later GPUs compile when
# they load it): there is no GPU during the build to detect. KD_LIB_OPS_DIR: where
# `python -m kd_lib.ops.build` puts the kernels and where kd_lib.ops looks for them.
ENV TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" \
    KD_LIB_OPS_DIR=/opt/kd_lib_ops
COPY --from=source /src /src
RUN pip install "setuptools>=69" \
    && pip install --no-build-isolation /src
# the kernels, from the installed package (outside /src): the train stage has no compiler
RUN cd / && python -m kd_lib.ops.build

FROM nvidia/cuda:${CUDA_VERSION}-base-ubuntu22.04 AS train
# base, not runtime or cudnn-runtime: the torch wheels carry their own cuBLAS, cuDNN and NCCL
COPY --from=train-build /opt/python /opt/python
COPY --from=train-build /opt/venv /opt/venv
COPY --from=train-build /opt/kd_lib_ops /opt/kd_lib_ops
# the same TORCH_CUDA_ARCH_LIST as the build: it is part of the kernels' tag, which names their folder
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" \
    KD_LIB_OPS_DIR=/opt/kd_lib_ops
RUN useradd --create-home --uid 1000 kdp
USER kdp
WORKDIR /home/kdp
ENTRYPOINT ["kdp"]
