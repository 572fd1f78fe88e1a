# One image per role, each a target of this file (the roles of components/image.py):
#   cpu    source-version, prepare-data, evaluate and export
#   train  the training tasks and every TorchX job, with the kd_lib.ops CUDA kernels built for A100
#          and H100/H200 (with PTX for later GPUs)
# `make images` builds both and tags them as components/image.py names them:
#   docker build --target cpu -t ghcr.io/kd-pipeline/kdp-cpu:0.1.0 .
#   docker build --target train -t ghcr.io/kd-pipeline/kdp:0.1.0 .
#   docker run --gpus all ghcr.io/kd-pipeline/kdp:0.1.0 stage teacher --data gs://... --out gs://...
#
# Both images start from the same Python slim image and hold the same virtual environment, one
# layer that a node pulls once for both. No nvidia/cuda base: torch's wheels carry the CUDA
# libraries it runs with (cuBLAS, cuDNN, NCCL), and the CUDA compiler that builds the kernels comes
# from NVIDIA's wheels of the same CUDA release (pyproject's `kernels` extra) in a build stage that
# the train image leaves behind. So both images have the same Python, one way of installing it,
# and nothing is fetched at build time but the base image and wheels.
#
# Every Python package comes from requirements/run.lock (and kernels.lock for the build stage):
# exact versions with their hashes, so an image built next month is the same image. Build args:
#   PYTHON_IMAGE  the base; pinned by tag. To pin its digest too, append it
#                 (python:3.11-slim-bookworm@sha256:...; `docker image inspect` prints it).
#   WHEELHOUSE    a URL of a folder of the locked wheels (`make wheelhouse`) to install from instead
#                 of PyPI: for a machine with no PyPI access (`make images` serves ./wheelhouse at
#                 one when WHEELHOUSE=wheelhouse is set).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- the locked dependencies, in a virtual environment both images copy ----
FROM ${PYTHON_IMAGE} AS deps
ARG WHEELHOUSE=
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY requirements/run.lock /tmp/run.lock
RUN pip install --require-hashes ${WHEELHOUSE:+--no-index --find-links $WHEELHOUSE} -r /tmp/run.lock

# ---- what both roles run on: the environment and the project, a non-root user, kdp ----
FROM ${PYTHON_IMAGE} AS runtime
# the dependencies (one large layer, unchanged while the lock is), then the project (a small one)
COPY --from=deps /opt/venv /opt/venv
# first on PATH: KFP runs its components with `python3 -m kfp.dsl.executor_main`, which must be
# the venv's interpreter
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# without its dependencies (all locked above; setuptools, which builds it, among them)
COPY pyproject.toml README.md /src/
COPY kd_lib /src/kd_lib
COPY components /src/components
COPY pipelines /src/pipelines
RUN pip install --no-deps --no-build-isolation /src && rm -rf /src
COPY containers/entrypoint.sh /usr/local/bin/kdp-entrypoint
RUN useradd --create-home --uid 1000 kdp
USER kdp
# writable by the user, for `kdp run`'s runs/ and the caches under ~/.cache
WORKDIR /home/kdp
# `docker run IMAGE stage evaluate ...` runs kdp; a command on PATH (KFP's executor, TorchX's
# torchrun, python3) runs as given, also where a runner passes it as arguments, not as the entrypoint
ENTRYPOINT ["kdp-entrypoint"]

# ---- cpu ----
FROM runtime AS cpu
# the kd_lib.ops PyTorch references: no kernels to load or build
ENV KD_LIB_DISABLE_CUDA_OPS=1

# ---- train: the kernels, compiled in a stage of their own with the CUDA compiler's wheels ----
FROM deps AS kernels-build
ARG WHEELHOUSE=
# g++: the host compiler under nvcc
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
COPY requirements/kernels.lock /tmp/kernels.lock
RUN pip install --require-hashes ${WHEELHOUSE:+--no-index --find-links $WHEELHOUSE} -r /tmp/kernels.lock
# the CUDA toolkit the wheels make (bin/nvcc, include/, lib/); compute capabilities of A100 (8.0)
# and H100/H200 (9.0, with PTX that later GPUs compile when they load it): there is no GPU during
# the build to detect. KD_LIB_OPS_DIR: where `python -m kd_lib.ops.build` puts the kernels.
ENV CUDA_HOME=/opt/venv/lib/python3.11/site-packages/nvidia/cu13 \
    TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" \
    KD_LIB_OPS_DIR=/opt/kd_lib_ops \
    PYTHONPATH=/src
# the linker's name for the CUDA runtime, which the wheel ships only as its soname
RUN ln -s libcudart.so.13 "$CUDA_HOME/lib/libcudart.so"
# kd_lib.ops alone (it imports nothing else of the project): other changes keep this layer
COPY kd_lib/__init__.py /src/kd_lib/
COPY kd_lib/ops /src/kd_lib/ops
RUN python -m kd_lib.ops.build

FROM runtime AS train
COPY --from=kernels-build /opt/kd_lib_ops /opt/kd_lib_ops
# the same TORCH_CUDA_ARCH_LIST as the build: it is part of the kernels' tag, which names their folder
ENV TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" \
    KD_LIB_OPS_DIR=/opt/kd_lib_ops
