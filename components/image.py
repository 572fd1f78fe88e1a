"""The container images the stages run in: one per role, tagged with the project's version.

Each is a target of the top-level ``Dockerfile`` of the same name (``docker build --target
train``): ``train`` (CUDA, torch's CUDA build and the kd_lib.ops kernels) for the tasks that
train in their own pod and for every TorchX job; ``cpu`` (torch's CPU build, onnxruntime, no
CUDA) for every other task. ``kdp compile --image-train/--image-cpu`` choose others.
"""

IMAGES = {"train": "ghcr.io/kd-pipeline/kdp:0.1.0", "cpu": "ghcr.io/kd-pipeline/kdp-cpu:0.1.0"}
