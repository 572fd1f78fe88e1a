"""Detector level and anchor alignment between an HR model and an LR one (AFP, MSAD), on ResNets and MobileNets."""

import math

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from kd_lib.models.detectors import MOBILENETS, build_detector

HR = 128


def grids_and_anchors(model, side):
    images = torch.zeros(1, 3, side, side)
    features = list(model.eval().backbone(images).values())
    anchors = model.anchor_generator(ImageList(images, [(side, side)]), features)[0]
    return [tuple(f.shape[-2:]) for f in features], anchors


@pytest.mark.parametrize("kind", ["retinanet", "fcos"])
@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
@pytest.mark.parametrize("ratio", [2, 4])
def test_afp_assistant_levels_and_anchors_pair_one_to_one_with_the_students(kind, backbone, ratio):
    shift = int(math.log2(ratio))
    assistant = build_detector(kind, backbone, 3, image_size=HR, first_level=3 + shift, highest_level=7 + shift)
    student = build_detector(kind, backbone, 3, image_size=HR // ratio, highest_level=7 + shift)
    student.load_state_dict(assistant.state_dict())  # one parameter set: the student starts from the assistant
    hr_grids, hr_anchors = grids_and_anchors(assistant, HR)
    lr_grids, lr_anchors = grids_and_anchors(student, HR // ratio)
    assert hr_grids == lr_grids == [(math.ceil(HR / ratio / 2**level),) * 2 for level in range(3, 8)]
    assert hr_anchors.shape == lr_anchors.shape
    torch.testing.assert_close(hr_anchors / ratio, lr_anchors, rtol=0, atol=1e-4)  # same regions, scaled by K


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_msad_lr_branch_reads_one_level_lower(backbone):
    hr = build_detector("fcos", backbone, 3, image_size=HR, lowest_level=2)
    lr = build_detector("fcos", backbone, 3, image_size=HR // 2, first_level=2, lowest_level=2)
    lr.load_state_dict(hr.state_dict())
    (hr_grids, hr_points), (lr_grids, lr_points) = grids_and_anchors(hr, HR), grids_and_anchors(lr, HR // 2)
    assert hr_grids == lr_grids and hr_grids[0] == (HR // 8, HR // 8) and lr_grids[0] == (HR // 2 // 4,) * 2
    torch.testing.assert_close(hr_points / 2, lr_points, rtol=0, atol=1e-4)


@pytest.mark.parametrize("backbone, taps", [
    ("resnet18", {"layer1": "2", "layer2": "3", "layer3": "4", "layer4": "5"}),
    ("mobilenet_v2", {"3": "2", "6": "3", "13": "4", "18": "5"}),
    ("mobilenet_v3_small", {"1": "2", "3": "3", "8": "4", "12": "5"}),
])
def test_the_pyramid_reads_the_last_block_at_each_stride(backbone, taps):
    pyramid = build_detector("fcos", backbone, 3, image_size=64, lowest_level=2).backbone.pyramid
    assert pyramid.body.return_layers == taps


def test_detectors_train_and_predict_on_their_own_sizes():
    model = build_detector("retinanet", "resnet18", 3, image_size=64)
    targets = [{"boxes": torch.tensor([[4.0, 8.0, 40.0, 50.0]]), "labels": torch.tensor([1])}]
    losses = model(torch.rand(1, 3, 64, 64), targets)
    assert set(losses) == {"classification", "bbox_regression"} and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        (prediction,) = model(torch.rand(1, 3, 64, 64))
    assert set(prediction) == {"boxes", "scores", "labels"}


@pytest.mark.parametrize("backbone", MOBILENETS)
def test_mobilenet_detectors_train_on_a_batch(backbone):
    model = build_detector("fcos", backbone, 3, image_size=64)
    model.train()
    targets = [{"boxes": torch.tensor([[4.0, 8.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 2.0, 60.0, 30.0]]), "labels": torch.tensor([2])}]
    losses = model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], targets)
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    assert all(torch.isfinite(v) for v in losses.values())


def test_fcos_box_distances_start_alive_at_the_chosen_width():
    model = build_detector("fcos", "resnet18", 3, image_size=64, fpn_channels=64).eval()
    with torch.no_grad():
        features = list(model.backbone(torch.rand(2, 3, 64, 64)).values())
        distances = model.head(features)["bbox_regression"]
    assert all(f.shape[1] == 64 for f in features)
    assert (distances > 0).float().mean() > 0.99  # at torchvision's zero bias about half start dead at 0


@pytest.mark.parametrize("backbone", ["vgg11", "nope", "vit_b_16"])
def test_unknown_backbones_are_named_with_the_accepted_ones(backbone):
    with pytest.raises(ValueError, match=rf"'{backbone}' is not a torchvision ResNet or MobileNet") as error:
        build_detector("retinanet", backbone, 3, image_size=64)
    assert all(name in str(error.value) for name in ("resnet18", "resnext50_32x4d", *MOBILENETS))


@pytest.mark.parametrize("kwargs, words", [
    ({"kind": "yolo"}, "unknown detector 'yolo'"),
    ({"first_level": 4}, "the head's levels P4..P8 are not all in the pyramid P3..P7"),
    ({"lowest_level": 1}, "must start at P2 or P3"),
    ({"fpn_channels": 48}, "fpn_channels must be a positive multiple of 32, got 48"),
])
def test_bad_detector_settings_are_named(kwargs, words):
    settings = {"kind": "retinanet", "backbone": "resnet18", "num_classes": 3, "image_size": 64, **kwargs}
    with pytest.raises(ValueError, match=words):
        build_detector(**settings)
