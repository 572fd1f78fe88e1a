"""The export stage: ONNX that onnxruntime runs like PyTorch, its contract and its int8 version;
and training stages that start from weights and say so."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from components import export, lr_baseline, teacher
from kd_lib.config import from_dict
from kd_lib.data.shards import ShardedImageDataset
from kd_lib.data.transforms import CropTransform
from kd_lib.io.fs import read_text
from kd_lib.io.manifest import published_uri, read_manifest
from kd_lib.models.store import load_classifier

TINY = {"epochs": 1, "batch_size": 8, "hr_size": 32, "ratio": 4, "num_workers": 0, "lr": 0.05}


@pytest.fixture(scope="module")
def lr_student(prepared, tmp_path_factory):
    """An LR model (8 px) trained one epoch from a teacher's weights: trunk from the teacher, new head."""
    root = tmp_path_factory.mktemp("export")
    teacher.run(from_dict(teacher.TeacherConfig, {**TINY, "data": prepared, "out": str(root / "t"),
                                                  "arch": "resnet18"}))
    lr_baseline.run(from_dict(lr_baseline.LRBaselineConfig, {**TINY, "data": prepared, "out": str(root / "s"),
                                                             "arch": "resnet18", "weights": str(root / "t")}))
    return str(root / "s"), str(root / "t")


def test_a_stage_started_from_weights_records_it(lr_student):
    out, teacher_out = lr_student
    manifest = read_manifest(out)
    assert manifest["started_from"] == teacher_out
    assert manifest["weights"]["taken"] == 122 and not manifest["weights"]["reinitialized"]
    _, meta = load_classifier(out)
    assert meta["info"]["resize"] == "bilinear" and meta["info"]["mean"] == [0.485, 0.456, 0.406]


@pytest.mark.slow
def test_export_runs_in_onnxruntime_like_pytorch(prepared, lr_student, tmp_path):
    model_uri, teacher_out = lr_student
    out = tmp_path / "export"
    manifest = export.run(from_dict(export.ExportConfig, {"model": model_uri, "data": prepared, "out": str(out),
                                                          "calibration_images": 16, "latency_repeats": 2}))
    numbers = manifest["final"]
    assert numbers["max_rel_diff"] <= 1e-3 and numbers["agreement"] >= 0.95
    assert 0 <= numbers["int8_top1"] <= 1 and numbers["int8_bytes"] < numbers["onnx_bytes"] / 2
    contract = json.loads(read_text(published_uri(str(out), "model.json")))
    assert contract["input_size"] == 8 and contract["ratio"] == 4 and contract["resize"] == "bilinear"
    assert contract["classes"] == ["class0", "class1", "class2"] and contract["started_from"] == teacher_out

    # the exported file on its own, against PyTorch, at a batch size it was not exported with
    graph = onnx.load(published_uri(str(out), "model.onnx"))
    assert graph.opset_import[0].version >= 17
    model, _ = load_classifier(model_uri)
    val = ShardedImageDataset(prepared, "val", CropTransform(32, 4, train=False))
    images = torch.stack([torch.as_tensor(val[i][0]) for i in range(5)])
    _, lr = val.pairing(images)
    session = ort.InferenceSession(published_uri(str(out), "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": lr.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(lr).numpy(), atol=1e-4)
    # a second run is a no-op
    assert export.run(from_dict(export.ExportConfig, {"model": model_uri, "data": prepared, "out": str(out),
                                                      "calibration_images": 16, "latency_repeats": 2})) == manifest


@pytest.mark.slow
def test_a_detector_exports_its_dense_outputs(prepared_detection, tmp_path):
    from kd_lib.io.publish import Publication
    from kd_lib.models.detector_store import DetectorSpec, save_detector

    torch.manual_seed(0)
    spec = DetectorSpec("fcos", "resnet18", 2, 64)  # the LR side of the 128 px data at ratio 2
    with Publication(str(tmp_path / "student"), "detector", "k") as publication:
        save_detector(publication.folder, spec.build(), spec, ["red", "blue"], started_from="random")
        publication.commit(["model.pt"], {})
    out = tmp_path / "export"
    manifest = export.run(from_dict(export.ExportConfig, {"model": str(tmp_path / "student"), "data": prepared_detection,
                                                          "out": str(out), "calibration_images": 4,
                                                          "latency_repeats": 1, "batch_size": 4}))
    assert manifest["final"]["max_rel_diff"] <= 1e-3 and manifest["final"]["compared_unit"] == "anchors"
    contract = json.loads(read_text(published_uri(str(out), "model.json")))
    assert contract["outputs"] == ["bbox_ctrness", "bbox_regression", "cls_logits"] and contract["ratio"] == 2
    session = ort.InferenceSession(published_uri(str(out), "model.onnx"), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"input": np.random.default_rng(0).random((3, 3, 64, 64), dtype=np.float32)})
    assert [o.shape[0] for o in outputs] == [3, 3, 3] and outputs[2].shape[-1] == 2


def test_data_with_other_class_names_is_named_with_both_lists(lr_student, tmp_path, make_imagefolder):
    """Three classes in the data as in the model, but other names: the message lists both."""
    from kd_lib.data.shards import prepare_imagefolder
    from kd_lib.errors import DataError

    source = make_imagefolder(tmp_path / "src", train=4, val=2)
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog", "eel")):
            (source / split / f"class{c}").rename(source / split / name)
    other = str(tmp_path / "other")
    prepare_imagefolder(str(source), other)
    with pytest.raises(DataError, match=r"\[class0, class1, class2\].*\[cat, dog, eel\]"):
        export.run(from_dict(export.ExportConfig, {"model": lr_student[0], "data": other, "out": str(tmp_path / "e")}))
