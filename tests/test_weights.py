"""Where a model starts from: every weights form, the head rule, refusals and the fine-tuning lr."""

import os
import pickle

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from kd_lib.engine.loop import build_optimizer
from kd_lib.engine.settings import TrainSettings
from kd_lib.models import build_classifier
from kd_lib.models.detector_store import DetectorSpec
from kd_lib.models.store import save_classifier
from kd_lib.models.weights import WeightsError, load_backbone_weights, lr_scales, start_classifier
from test_gcs import gcs  # noqa: F401  (the GCS emulator fixture)


def same(model, state, names):
    own = model.state_dict()
    return all(torch.equal(own[n], state[n]) for n in names)


@pytest.fixture
def resnet_state():
    torch.manual_seed(1)
    return build_classifier("resnet18", 10).state_dict()


def test_random_is_the_default():
    model, report = start_classifier("resnet18", 3, "")
    assert report is None and model.fc.out_features == 3


def test_state_dict_file_same_classes_takes_everything(tmp_path, resnet_state):
    path = tmp_path / "sd.pt"
    torch.save(resnet_state, path)
    model, report = start_classifier("resnet18", 10, str(path))
    assert len(report.taken) == len(resnet_state) and not report.reinitialized and not report.skipped
    assert same(model, resnet_state, resnet_state)


def test_class_count_mismatch_reinitializes_the_head_alone_and_says_so(tmp_path, resnet_state):
    path = tmp_path / "sd.pt"
    torch.save(resnet_state, path)
    model, report = start_classifier("resnet18", 4, str(path))
    assert set(report.reinitialized) == {"fc.weight", "fc.bias"}
    assert "10 classes in the file, 4 here" in report.summary()
    trunk = [n for n in resnet_state if not n.startswith("fc.")]
    assert same(model, resnet_state, trunk) and model.fc.weight.shape == (4, 512)


def test_project_model_folder(tmp_path, resnet_state):
    model = build_classifier("resnet18", 10)
    model.load_state_dict(resnet_state)
    save_classifier(str(tmp_path / "teacher"), model, arch="resnet18", classes=list("abcdefghij"), input_size=32)
    for uri in (tmp_path / "teacher", tmp_path / "teacher" / "model.pt"):
        loaded, report = start_classifier("resnet18", 10, str(uri))
        assert same(loaded, resnet_state, resnet_state)


def test_safetensors_file(tmp_path, resnet_state):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in resnet_state.items()}, str(path))
    model, report = start_classifier("resnet18", 10, str(path))
    assert len(report.taken) == len(resnet_state) and same(model, resnet_state, resnet_state)


def test_memory_uri(resnet_state):
    import io

    import fsspec

    buffer = io.BytesIO()
    torch.save(resnet_state, buffer)
    with fsspec.open("memory://weights/sd.pt", "wb") as f:
        f.write(buffer.getvalue())
    model, _ = start_classifier("resnet18", 10, "memory://weights/sd.pt")
    assert same(model, resnet_state, resnet_state)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/kdp-weights-pwned",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"fc.weight": RunsCode()}))
    with pytest.raises(WeightsError, match="refused"):
        start_classifier("resnet18", 10, str(path))
    assert not os.path.exists("/tmp/kdp-weights-pwned")


def test_wrong_architecture_names_a_tensor(tmp_path, resnet_state):
    path = tmp_path / "sd.pt"
    torch.save(resnet_state, path)
    with pytest.raises(WeightsError, match=r"'layer1\.2\."):  # resnet34 has a third block in layer1
        start_classifier("resnet34", 10, str(path))
    torch.save(build_classifier("resnet50", 10).state_dict(), path)
    with pytest.raises(WeightsError, match=r"tensor 'layer1\.0\.bn3\.bias' .* not in the model"):
        start_classifier("resnet18", 10, str(path))
    torch.save({**resnet_state, "layer2.0.conv1.weight": torch.zeros(64, 64, 3, 3)}, path)
    with pytest.raises(WeightsError, match=r"tensor 'layer2\.0\.conv1\.weight' has shape \(64, 64, 3, 3\)"):
        start_classifier("resnet18", 10, str(path))


def test_torchvision_enum_from_the_torch_home_cache(tmp_path, monkeypatch, resnet_state):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    with pytest.raises(WeightsError, match=rf"{os.path.basename(url)} is missing.*TORCH_HOME={tmp_path}"):
        start_classifier("resnet18", 5, "torchvision:IMAGENET1K_V1")
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    imagenet = build_classifier("resnet18", 1000).state_dict()
    torch.save(imagenet, cache / os.path.basename(url))
    for name in ("IMAGENET1K_V1", "DEFAULT"):
        model, report = start_classifier("resnet18", 5, f"torchvision:{name}")
        assert set(report.reinitialized) == {"fc.weight", "fc.bias"}
        assert same(model, imagenet, [n for n in imagenet if not n.startswith("fc.")])
    with pytest.raises(WeightsError, match="no member 'IMAGENET9K'"):
        start_classifier("resnet18", 5, "torchvision:IMAGENET9K")


def test_timm_from_a_local_file_and_pretrained_in_the_arch(tmp_path):
    source = build_classifier("timm:resnet10t", 1000).state_dict()
    path = tmp_path / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in source.items()}, str(path))
    model, report = start_classifier("timm:resnet10t", 6, f"timm:c3_in1k,file={path}")
    assert set(report.reinitialized) == {"fc.weight", "fc.bias"}
    assert same(model, source, [n for n in source if not n.startswith("fc.")])
    # pretrained=True in the arch used to reach timm twice (TypeError); it now means weights "timm:"
    with pytest.raises(WeightsError, match="timm:,file=x"):
        start_classifier("timm:resnet10t,pretrained=True", 6, "timm:,file=x")
    assert build_classifier("timm:resnet10t,pretrained=True", 6).fc.out_features == 6


def test_detector_backbone_takes_a_classification_trunk(tmp_path, resnet_state):
    path = tmp_path / "teacher.pt"
    torch.save(resnet_state, path)
    spec = DetectorSpec("fcos", "resnet18", 2, 64)
    detector = spec.build()
    report = load_backbone_weights(detector, "resnet18", str(path))
    body = detector.backbone.pyramid.body.state_dict()
    assert all(torch.equal(body[n], resnet_state[n]) for n in body)
    assert set(report.skipped) == {"fc.weight", "fc.bias"}
    scales = lr_scales(detector, report, 0.1)
    assert id(detector.backbone.pyramid.body.conv1.weight) in scales
    assert id(detector.head.classification_head.cls_logits.weight) not in scales


def test_fine_tuning_lr_trunk_below_head(tmp_path, resnet_state):
    path = tmp_path / "sd.pt"
    torch.save(resnet_state, path)
    model, report = start_classifier("resnet18", 4, str(path))
    optimizer = build_optimizer(list(model.parameters()), TrainSettings(lr=0.1), lr_scales(model, report, 0.1))
    by_lr = {round(group["lr"], 6): {id(p) for p in group["params"]} for group in optimizer.param_groups}
    assert by_lr.keys() == {0.01, 0.1}
    assert by_lr[0.1] == {id(model.fc.weight), id(model.fc.bias)}


def test_gs_uri_through_the_gcs_emulator(gcs, resnet_state):
    import io

    buffer = io.BytesIO()
    torch.save(resnet_state, buffer)
    gcs.mkdir("weights")
    gcs.pipe("weights/teacher/model.pt", buffer.getvalue())
    model, report = start_classifier("resnet18", 10, "gs://weights/teacher")
    assert len(report.taken) == len(resnet_state) and same(model, resnet_state, resnet_state)
    with pytest.raises(FileNotFoundError, match="gs://weights/missing.pt"):
        start_classifier("resnet18", 10, "gs://weights/missing.pt")


def test_prepare_data_selects_imagefolder_classes(tmp_path, make_imagefolder):
    from kd_lib.data.imagefolder import DataError
    from kd_lib.data.shards import prepare_imagefolder

    source = make_imagefolder(tmp_path / "src", classes=3, train=2, val=1, size=8)
    manifest = prepare_imagefolder(str(source), str(tmp_path / "data"), classes=["class2", "class0"])
    assert manifest["classes"] == ["class2", "class0"] and manifest["splits"]["train"]["images"] == 4
    with pytest.raises(DataError, match=r"\['class7'\] are not class folders"):
        prepare_imagefolder(str(source), str(tmp_path / "data2"), classes=["class7"])
