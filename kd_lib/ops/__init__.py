"""Custom operators for the hot paths of training, each a CUDA kernel with a PyTorch reference.

- :func:`paired_resize`: a uint8 NHWC batch to the normalized HR batch and its
  antialiased LR batch, in one pass (:mod:`kd_lib.ops.paired_resize`);
- :func:`kd_loss`: temperature softmax, KL and its gradient fused
  (:mod:`kd_lib.ops.kd_loss`);
- :func:`multi_bandwidth_mmd2`: MMD^2 over several Gaussian bandwidths and its
  gradient without one kernel matrix per bandwidth (:mod:`kd_lib.ops.mmd`).

Each is a ``torch.library`` custom operator in the ``kd_lib`` namespace with
a fake kernel (so ``torch.compile`` traces through it) and, where it has a
gradient, a backward operator. On CUDA tensors the operator runs the kernel of
the extension (:mod:`kd_lib.ops.extension`: built ahead of time in the image,
or compiled on first use), on every other device, or when the extension is
unavailable or ``KD_LIB_DISABLE_CUDA_OPS=1``, the pure-PyTorch reference.
"""

from kd_lib.ops.kd_loss import kd_loss
from kd_lib.ops.mmd import multi_bandwidth_mmd2
from kd_lib.ops.paired_resize import RESIZE_MODES, ResizeMode, downsample, paired_resize

__all__ = ["RESIZE_MODES", "ResizeMode", "downsample", "kd_loss", "multi_bandwidth_mmd2", "paired_resize"]
