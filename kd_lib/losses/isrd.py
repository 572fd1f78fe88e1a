"""ISRD: input spatial representation distillation."""

from __future__ import annotations

import torch
import torch.nn as nn

from kd_lib.models.isrd import ISRDDecoder


class ISRDLoss(nn.Module):
    """L1 between the HR image and its reconstruction from the student's input feature.

    Guo et al., Pixel Distillation, TPAMI 2024 (official code
    gyguo/PixelDistillation)::

        L_isrd = mean |decoder(f) - I_HR|

    ``f`` is the student's input-module feature (a ResNet's ``conv1`` output
    before BN and ReLU, see :func:`kd_lib.models.input_module_name`), the mean
    runs over batch, channels and pixels, and ``I_HR`` is the normalized HR
    image that the teacher sees. No teacher feature is involved. The loss owns
    the :class:`~kd_lib.models.isrd.ISRDDecoder`, so the decoder's parameters
    are the loss's parameters: give them to the optimizer, and drop them at
    deployment. The image is a target and is detached.

    Args:
        in_channels: channels of ``f``.
        feature_size: spatial size of ``f`` (int or ``(h, w)``).
        hr_size: side of the HR image (int or ``(H, W)``).
    """

    def __init__(
        self,
        in_channels: int,
        feature_size: int | tuple[int, int],
        hr_size: int | tuple[int, int],
    ) -> None:
        super().__init__()
        self.decoder = ISRDDecoder(in_channels, feature_size, hr_size)

    def forward(self, feature: torch.Tensor, hr_image: torch.Tensor) -> torch.Tensor:
        """Scalar loss for a ``(N, C, h, w)`` feature and its ``(N, 3, H, W)`` HR image.

        Raises:
            ValueError: the decoded image and ``hr_image`` differ in shape.
        """
        reconstruction = self.decoder(feature)
        if reconstruction.shape != hr_image.shape:
            raise ValueError(
                f"decoded image of shape {tuple(reconstruction.shape)} does not match "
                f"the HR image of shape {tuple(hr_image.shape)}"
            )
        return (reconstruction - hr_image.detach()).abs().mean()
