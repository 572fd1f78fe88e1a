"""torchvision detectors whose pyramid levels are chosen per input resolution.

A RetinaNet or FCOS head reads five consecutive FPN levels, ``P_first`` to
``P_first+4`` (``P3``-``P7`` in torchvision), level ``P_l`` having stride
``2^l``. On an image ``K = 2^s`` times smaller, level ``P_l`` has the grid
that ``P_{l+s}`` has on the full image. So one architecture whose pyramid runs
from ``lowest_level`` to ``highest_level`` serves every resolution, and each
model picks its window of five levels:

- AFP (Pixel Distillation's aligned feature for preservation, our
  reconstruction): the LR student reads ``P3``-``P7``; the HR assistant reads
  ``P(3+s)``-``P(7+s)``, so both heads predict on the same grids, level by
  level, and their outputs pair one to one;
- MSAD (Qi et al., CVPR 2021): the HR branch reads ``P3``-``P7`` and the LR
  branch ``P2``-``P6`` (``K = 2``).

The models share one parameter set whatever their window, so the LR student
starts from the assistant's (or the teacher's) weights as they are. The
anchors (RetinaNet: sizes ``4 * 2^l * 2^(j/3)``, ``j = 0, 1, 2``, aspect ratios
1:2, 1:1, 2:1; FCOS: one point per cell, size ``2^l``) follow the level, so an
HR anchor on ``P_{l+s}`` is exactly ``K`` times the LR anchor on ``P_l``, at
the same place. Built by configuring and wrapping torchvision's modules:
:class:`~torchvision.models.detection.backbone_utils.BackboneWithFPN`, its
detectors and their anchor generator.

The backbone is a torchvision ResNet (``resnet18``, ``resnext50_32x4d``,
``wide_resnet50_2``, ...) or MobileNet (``mobilenet_v2``,
``mobilenet_v3_large``, ``mobilenet_v3_small``), randomly initialised. The
FPN reads ``P_l`` from the output of the last backbone block at stride
``2^l``, ``l = lowest_level..5``: the ResNet stages ``layer1``-``layer4``, the
matching blocks of a MobileNet's ``features``. Blocks and channels are found by
running the backbone's blocks once on a dummy image, so no per-model table is
kept.

Our choices:

- Levels above ``P5`` come from stride-2 3x3 convolutions on ``P5``, one per
  level with ReLU between (torchvision's ``LastLevelP6P7``, extended to as many
  levels as the window needs). METHODS.md allows pooling the assistant's
  feature where a level has no partner; extra levels give the assistant a real
  feature there instead, for a negligible cost (the top maps are 1x1 to 4x4).
  A model computes every level of the architecture; those outside its window
  cost a few MFLOPs.
- Anchor sizes are exact powers of two times ``2^(j/3)``, and the cell
  anchors are not rounded to whole pixels: torchvision rounds both (sizes 32,
  40, 50; corners to integers), which puts an HR anchor up to a pixel away from
  K times its LR partner. :class:`ExactAnchorGenerator` drops the rounding.
- FCOS's box distances start alive (:data:`FCOS_BOX_BIAS`).
- The images are fed at their size: the detector's transform normalizes
  (ImageNet mean and std) and neither resizes nor pads (``size_divisible=1``);
  grids then line up whenever the HR side is a multiple of ``K``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

DetectorKind = Literal["retinanet", "fcos"]
HEAD_LEVELS = 5
#: Detections kept per image for evaluation: COCO's usual 0.05 score floor
#: (torchvision's RetinaNet default; its FCOS default, 0.2, would cut the
#: low-confidence tail that AP counts) and COCO's limit of 100 per image.
SCORE_THRESHOLD, DETECTIONS_PER_IMAGE = 0.05, 100
FPN_CHANNELS = 256  # torchvision's; a narrower pyramid and head cut the head's FLOPs quadratically
TOP_BACKBONE_LEVEL = 5  # the backbones end at stride 32
PROBE_SIDE = 64  # a dummy image this size leaves a 2x2 map at stride 32
MOBILENETS = ("mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small")
#: The initial bias of FCOS's box distances, in anchor sizes. torchvision's head puts a ReLU on them and
#: starts the bias at 0, so about half start at zero; from scratch the whole box branch can then die
#: within the first steps (every distance 0, the GIoU loss stuck at 1), as it did here on small sets
#: for some seeds. At 1 every distance starts alive, a box of two anchor sizes around each point.
FCOS_BOX_BIAS = 1.0


class ExtraLevels(ExtraFPNBlock):
    """``P6``, ``P7``, ... from ``P5``: ``count`` stride-2 3x3 convs, ReLU between them."""

    def __init__(self, channels: int, count: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, 2, 1) for _ in range(count))
        for conv in self.convs:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.constant_(conv.bias, 0)

    def forward(self, p: list[torch.Tensor], c: list[torch.Tensor], names: list[str]
                ) -> tuple[list[torch.Tensor], list[str]]:
        x = p[-1]
        for index, conv in enumerate(self.convs):
            x = conv(x if index == 0 else F.relu(x))
            p.append(x)
            names.append(f"p{6 + index}")
        return p, names


class LevelWindow(nn.Module):
    """A feature pyramid ``P_lowest``..``P_highest`` that returns only ``P_first``..``P_first+4``."""

    def __init__(self, pyramid: BackboneWithFPN, lowest_level: int, first_level: int):
        super().__init__()
        self.pyramid, self.lowest_level, self.first_level = pyramid, lowest_level, first_level
        self.out_channels = pyramid.out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        levels = list(self.pyramid(images).values())
        start = self.first_level - self.lowest_level
        return OrderedDict((f"p{self.first_level + i}", levels[start + i]) for i in range(HEAD_LEVELS))


class ExactAnchorGenerator(AnchorGenerator):
    """torchvision's anchor generator with the cell anchors left unrounded.

    A cell anchor of size ``s`` and aspect ratio ``r`` is the box
    ``(-w/2, -h/2, w/2, h/2)`` with ``h = s sqrt(r)`` and ``w = s / sqrt(r)``,
    as in torchvision, which then rounds it to whole pixels.
    """

    def generate_anchors(self, scales, aspect_ratios, dtype: torch.dtype = torch.float32,
                         device: torch.device = torch.device("cpu")) -> torch.Tensor:
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=dtype, device=device))
        ws = (scales[None, :] / h_ratios[:, None]).reshape(-1)
        hs = (scales[None, :] * h_ratios[:, None]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2


def anchor_generator(kind: DetectorKind, first_level: int) -> AnchorGenerator:
    """The anchors (RetinaNet) or points (FCOS) of the window ``P_first``..``P_first+4``."""
    levels = range(first_level, first_level + HEAD_LEVELS)
    if kind == "retinanet":
        sizes = tuple(tuple(4.0 * 2**level * 2 ** (j / 3) for j in range(3)) for level in levels)
        return ExactAnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * HEAD_LEVELS)
    return ExactAnchorGenerator(tuple((float(2**level),) for level in levels), ((1.0,),) * HEAD_LEVELS)


def accepted_backbones() -> list[str]:
    """The backbone names :func:`build_detector` takes: torchvision's ResNets and its three MobileNets."""
    resnets = torchvision.models.list_models(module=torchvision.models,
                                             include=["resnet*", "resnext*", "wide_resnet*"])
    return resnets + list(MOBILENETS)


def backbone_blocks(backbone: str) -> tuple[nn.Module, nn.Sequential]:
    """A randomly initialised backbone: the module the FPN wraps, and its blocks from the stem to stride 32.

    A MobileNet's ``features`` are both. A ResNet is wrapped whole, so its
    parameter names keep the classifier's; its blocks are its children up to
    ``layer4``, in the order its forward runs them (not ``avgpool`` and ``fc``).

    Raises:
        ValueError: ``backbone`` is not in :func:`accepted_backbones`.
    """
    accepted = accepted_backbones()
    if backbone not in accepted:
        raise ValueError(f"detector backbone {backbone!r} is not a torchvision ResNet or MobileNet; "
                         f"choose one of {', '.join(accepted)}")
    model = torchvision.models.get_model(backbone, weights=None)
    if backbone in MOBILENETS:
        return model.features, model.features
    return model, nn.Sequential(OrderedDict(list(model.named_children())[:-2]))


def last_block_per_level(blocks: nn.Sequential) -> dict[int, tuple[str, int]]:
    """Level ``l`` -> (name, output channels) of the last of ``blocks`` whose output has stride ``2^l``.

    The blocks run once, in order, on a ``PROBE_SIDE`` dummy image, in eval
    mode and without gradients so that no batch-norm statistic moves; each
    output's side gives its stride. The last block at a stride is the one a
    feature pyramid reads: it has seen the most of the image at that grid.
    """
    was_training = blocks.training
    blocks.eval()
    found, x = {}, torch.zeros(1, 3, PROBE_SIDE, PROBE_SIDE)
    with torch.no_grad():
        for name, block in blocks.named_children():
            x = block(x)
            found[(PROBE_SIDE // x.shape[-1]).bit_length() - 1] = (name, x.shape[1])
    blocks.train(was_training)
    return found


def pyramid_inputs(backbone: str, lowest_level: int) -> tuple[nn.Module, dict[str, str], list[int]]:
    """What the FPN ``P_lowest``..``P5`` reads from ``backbone``: (module, return layers, in_channels).

    In :class:`BackboneWithFPN`'s terms: the return layers map a block's name
    to its level's name, and in_channels lists the blocks' channels, level by
    level. Only these differ between a ResNet and a MobileNet.
    """
    body, blocks = backbone_blocks(backbone)
    outputs = last_block_per_level(blocks)
    levels = range(lowest_level, TOP_BACKBONE_LEVEL + 1)
    return body, {outputs[level][0]: str(level) for level in levels}, [outputs[level][1] for level in levels]


def build_detector(kind: DetectorKind, backbone: str, num_classes: int, *, image_size: int,
                   first_level: int = 3, lowest_level: int = 3, highest_level: int = 7,
                   fpn_channels: int = FPN_CHANNELS) -> nn.Module:
    """A randomly initialised RetinaNet or FCOS on a torchvision ResNet or MobileNet with an FPN.

    ``backbone`` is one of :func:`accepted_backbones` (``resnet18``,
    ``mobilenet_v3_large``, ...). ``lowest_level``..``highest_level`` fix the
    architecture (and so the parameters); ``first_level`` picks the five levels
    the head reads (see the module docstring). ``image_size`` is the side of
    the images it is fed. ``fpn_channels`` is the width of the pyramid and
    of the head's convolutions, a multiple of 32 (FCOS's head normalizes in
    32 groups); the head's cost grows with its square.

    Raises:
        ValueError: an unknown kind, a backbone that is not a torchvision
            ResNet or one of the three MobileNets, or a window outside the
            pyramid (``lowest_level`` must be 2 or 3, ``highest_level`` at
            least 6), or ``fpn_channels`` not a positive multiple of 32.
    """
    if kind not in ("retinanet", "fcos"):
        raise ValueError(f"unknown detector {kind!r}: choose retinanet or fcos")
    if lowest_level not in (2, 3) or highest_level < 6:
        raise ValueError(f"the pyramid must start at P2 or P3 and reach P6 or above, got "
                         f"P{lowest_level}..P{highest_level}")
    if not lowest_level <= first_level <= highest_level - HEAD_LEVELS + 1:
        raise ValueError(f"the head's levels P{first_level}..P{first_level + HEAD_LEVELS - 1} are not all "
                         f"in the pyramid P{lowest_level}..P{highest_level}")
    if fpn_channels <= 0 or fpn_channels % 32:
        raise ValueError(f"fpn_channels must be a positive multiple of 32, got {fpn_channels}")
    body, return_layers, in_channels = pyramid_inputs(backbone, lowest_level)
    pyramid = BackboneWithFPN(body, return_layers, in_channels, fpn_channels,
                              extra_blocks=ExtraLevels(fpn_channels, highest_level - TOP_BACKBONE_LEVEL))
    window = LevelWindow(pyramid, lowest_level, first_level)
    detector = RetinaNet if kind == "retinanet" else FCOS
    model = detector(window, num_classes, min_size=image_size, max_size=image_size, size_divisible=1,
                     anchor_generator=anchor_generator(kind, first_level), score_thresh=SCORE_THRESHOLD,
                     detections_per_img=DETECTIONS_PER_IMAGE)
    if kind == "fcos":
        nn.init.constant_(model.head.regression_head.bbox_reg.bias, FCOS_BOX_BIAS)
    return model
