"""Backbones, feature capture and the ISRD decoder."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from kd_lib.models import (
    FeatureCapture,
    ISRDDecoder,
    build_classifier,
    default_feature_layers,
    feature_shapes,
    input_module_name,
)

RESNET_LAYERS = ["conv1", "layer1", "layer2", "layer3", "layer4"]


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return build_classifier("resnet18", num_classes=5).eval()


@pytest.fixture(scope="module")
def mobilenet() -> nn.Module:
    torch.manual_seed(0)
    return build_classifier("mobilenet_v3_small", num_classes=5).eval()


# --- build_classifier -------------------------------------------------------


@pytest.mark.parametrize("side", [8, 16, 33, 64])
@pytest.mark.parametrize("model_fixture", ["resnet18", "mobilenet"])
def test_classifier_runs_at_any_size(model_fixture: str, side: int, request) -> None:
    model = request.getfixturevalue(model_fixture)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, side, side))
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()


def test_unknown_arch_names_it_and_close_matches() -> None:
    with pytest.raises(ValueError, match="resnet181") as info:
        build_classifier("resnet181", num_classes=3)
    assert "resnet18" in str(info.value).split("close matches:")[1]


def test_num_classes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_classifier("resnet18", num_classes=0)


# --- input module and feature layers ----------------------------------------


def test_input_module_name(resnet18: nn.Module, mobilenet: nn.Module) -> None:
    assert input_module_name(resnet18) == "conv1"
    assert input_module_name(mobilenet) == "features.0.0"


def test_input_module_name_without_conv() -> None:
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        input_module_name(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


def test_default_feature_layers(resnet18: nn.Module, mobilenet: nn.Module) -> None:
    assert default_feature_layers(resnet18) == ["layer1", "layer2", "layer3", "layer4"]
    before = {k: v.clone() for k, v in mobilenet.state_dict().items()}
    mobilenet.train()
    layers = default_feature_layers(mobilenet)  # the last block at strides 4, 8, 16 and 32
    assert layers == ["features.1", "features.3", "features.8", "features.12"] and mobilenet.training
    assert all(torch.equal(before[k], v) for k, v in mobilenet.state_dict().items())  # BN statistics untouched
    sides = {name: shape[-1] for name, shape in feature_shapes(mobilenet, layers, 64).items()}
    assert list(sides.values()) == [16, 8, 4, 2]
    with pytest.raises(ValueError, match="explicitly"):
        default_feature_layers(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))


# --- FeatureCapture ---------------------------------------------------------


def test_capture_returns_conv1_output_before_bn(resnet18: nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), FeatureCapture(resnet18, ["conv1", "layer4"]) as feats:
        resnet18(x)
        direct = resnet18.conv1(x)
        after_bn_relu = resnet18.relu(resnet18.bn1(direct))
    assert torch.equal(feats["conv1"], direct)
    assert not torch.allclose(feats["conv1"], after_bn_relu)
    assert (feats["conv1"] < 0).any()
    assert feats["layer4"].shape == (2, 512, 1, 1)
    assert set(feats) == {"conv1", "layer4"}


def test_capture_removes_hooks(resnet18: nn.Module) -> None:
    with FeatureCapture(resnet18, ["conv1", "layer2"]):
        assert len(resnet18.conv1._forward_hooks) == 1
        assert len(resnet18.layer2._forward_hooks) == 1
    assert len(resnet18.conv1._forward_hooks) == 0
    assert len(resnet18.layer2._forward_hooks) == 0

    capture = FeatureCapture(resnet18, ["conv1"])
    with torch.no_grad():
        resnet18(torch.randn(1, 3, 16, 16))
    capture.close()
    capture.close()
    assert len(resnet18.conv1._forward_hooks) == 0
    assert capture["conv1"].shape == (1, 64, 8, 8)


def test_capture_keeps_the_graph(resnet18: nn.Module) -> None:
    resnet18.zero_grad()
    with FeatureCapture(resnet18, ["conv1"]) as feats:
        resnet18(torch.randn(1, 3, 16, 16))
    feats["conv1"].sum().backward()
    assert resnet18.conv1.weight.grad is not None
    resnet18.zero_grad(set_to_none=True)


def test_capture_before_forward_is_a_key_error(resnet18: nn.Module) -> None:
    with FeatureCapture(resnet18, ["conv1"]) as feats, pytest.raises(KeyError, match="forward"):
        feats["conv1"]


def test_capture_unknown_names(resnet18: nn.Module) -> None:
    with pytest.raises(ValueError, match="layer5") as info:
        FeatureCapture(resnet18, ["conv1", "layer5", "conv9"])
    message = str(info.value)
    assert "conv9" in message and "layer4" in message
    assert len(resnet18.conv1._forward_hooks) == 0


# --- feature_shapes ---------------------------------------------------------


@pytest.mark.parametrize(
    ("side", "expected"),
    [
        (16, [(64, 8, 8), (64, 4, 4), (128, 2, 2), (256, 1, 1), (512, 1, 1)]),
        (64, [(64, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]),
    ],
)
def test_feature_shapes_resnet18(resnet18: nn.Module, side: int, expected: list) -> None:
    resnet18.train()
    running_mean = resnet18.bn1.running_mean.clone()
    shapes = feature_shapes(resnet18, RESNET_LAYERS, side)
    assert resnet18.training
    resnet18.eval()
    assert shapes == {name: torch.Size(shape) for name, shape in zip(RESNET_LAYERS, expected)}
    assert torch.equal(resnet18.bn1.running_mean, running_mean)
    assert len(resnet18.conv1._forward_hooks) == 0


# --- ISRD decoder -----------------------------------------------------------


@pytest.mark.parametrize(
    ("channels", "feature_size", "out_size", "scale"),
    [
        (64, 28, 224, 8),  # ResNet-18 at 56 px, 224 px HR: the paper's example
        (8, 9, 65, 8),  # 9 * 8 = 72, cropped to 65
        (8, 7, 64, 10),  # 7 * 10 = 70, cropped to 64
        (8, 10, 8, 1),  # feature already bigger than the image
        (8, 8, 8, 1),
        (8, (4, 8), (16, 20), 4),  # non-square: max(16 / 4, ceil(20 / 8))
    ],
)
def test_isrd_decoder_shapes(channels, feature_size, out_size, scale) -> None:
    decoder = ISRDDecoder(channels, feature_size, out_size)
    assert decoder.scale == scale
    assert decoder.conv.weight.shape == (3 * scale**2, channels, 1, 1)
    assert decoder.conv.bias is None
    assert decoder.prelu.weight.shape == (3,)
    fh, fw = (feature_size, feature_size) if isinstance(feature_size, int) else feature_size
    oh, ow = (out_size, out_size) if isinstance(out_size, int) else out_size
    image = decoder(torch.randn(2, channels, fh, fw))
    assert image.shape == (2, 3, oh, ow)


def test_isrd_decoder_resnet18_example_channels() -> None:
    assert ISRDDecoder(64, 28, 224).conv.out_channels == 192


def test_isrd_decoder_crops_top_left() -> None:
    decoder = ISRDDecoder(4, 9, 65)
    feature = torch.randn(1, 4, 9, 9)
    full = decoder.prelu(decoder.shuffle(decoder.conv(feature)))
    assert full.shape[-1] == 72
    assert torch.equal(decoder(feature), full[..., :65, :65])


def test_isrd_decoder_rejects_wrong_feature_size() -> None:
    decoder = ISRDDecoder(4, 8, 32)
    with pytest.raises(ValueError, match=r"\(1, 4, 7, 7\)"):
        decoder(torch.randn(1, 4, 7, 7))


def test_isrd_decoder_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="feature_size"):
        ISRDDecoder(4, 0, 32)
    with pytest.raises(ValueError, match="out_size"):
        ISRDDecoder(4, 8, (32, 32, 32))


def test_isrd_decoder_on_resnet18_conv1(resnet18: nn.Module) -> None:
    name = input_module_name(resnet18)
    channels, height, width = feature_shapes(resnet18, [name], 16)[name]
    decoder = ISRDDecoder(channels, (height, width), 64)
    assert decoder.scale == 8
    resnet18.zero_grad()
    with FeatureCapture(resnet18, [name]) as feats:
        resnet18(torch.randn(2, 3, 16, 16))
    image = decoder(feats[name])
    assert image.shape == (2, 3, 64, 64)
    image.abs().mean().backward()
    assert resnet18.conv1.weight.grad is not None
    assert decoder.conv.weight.grad is not None
    resnet18.zero_grad(set_to_none=True)
