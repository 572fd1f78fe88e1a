"""The ISRD decoder: from the student's input-module feature back to the HR image.

Guo et al., Pixel Distillation, TPAMI 2024; official code
gyguo/PixelDistillation (``lib/models/hrir.py``, ``SR1x1``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def _pair(size: int | tuple[int, int], what: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or any(not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"{what} must be a positive int or a pair of them, got {size!r}")
    return pair


class ISRDDecoder(nn.Module):
    """Maps a ``C x h_f x w_f`` feature to a ``3 x H x W`` image; training only.

    Known, from the official code (square case)::

        s = ceil(H / h_f)
        image = crop_HxW(PReLU_3(PixelShuffle_s(Conv1x1_{C -> 3 s^2, no bias}(f))))

    Example: ResNet-18 at 56 px gives a 64 x 28 x 28 ``conv1`` feature; for a
    224 px HR image ``s = 8``, the conv has 192 output channels, and the
    shuffled image is 224 x 224.

    Our choices:

    - Non-square sizes: ``s = max(ceil(H / h_f), ceil(W / w_f))``, one
      integer scale for both sides (PixelShuffle has one), so the shuffled
      image covers ``H x W``.
    - The crop keeps the top-left ``H x W``, as the official code does for the
      square case (``image[:, :, :H, :H]``): shuffled pixel ``(i, j)`` then
      comes from feature cell ``(i // s, j // s)``, the same origin as the
      input. When ``s`` divides both sides nothing is cropped.
    - ``s`` is at least 1: a feature already as large as the image
      (``h_f >= H``) gives ``s = 1``, a 1x1 conv to 3 channels, and the crop.

    Args:
        in_channels: ``C``, the feature's channels.
        feature_size: ``h_f`` (square) or ``(h_f, w_f)``.
        out_size: ``H`` (square) or ``(H, W)``, the HR image's side(s).
    """

    def __init__(
        self,
        in_channels: int,
        feature_size: int | tuple[int, int],
        out_size: int | tuple[int, int],
    ) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.feature_size = _pair(feature_size, "feature_size")
        self.out_size = _pair(out_size, "out_size")
        self.scale = max(
            math.ceil(out / feat) for out, feat in zip(self.out_size, self.feature_size)
        )
        self.conv = nn.Conv2d(in_channels, 3 * self.scale**2, kernel_size=1, bias=False)
        self.shuffle = nn.PixelShuffle(self.scale)
        self.prelu = nn.PReLU(3)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """``(N, C, h_f, w_f) -> (N, 3, H, W)``.

        Raises:
            ValueError: the feature's spatial size is not ``feature_size``.
        """
        if tuple(feature.shape[-2:]) != self.feature_size:
            raise ValueError(
                f"feature of shape {tuple(feature.shape)} does not have the spatial "
                f"size {self.feature_size} this decoder was built for"
            )
        height, width = self.out_size
        image = self.prelu(self.shuffle(self.conv(feature)))
        return image[..., :height, :width]
