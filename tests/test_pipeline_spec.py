"""The pipeline compiles to KFP v2 IR with the stages wired as designed."""

import yaml
from kfp import compiler

from pipelines.pixel_distillation import DEFAULT_IMAGE, build_pipeline


def test_pipeline_compiles_with_every_stage_wired(tmp_path):
    path = tmp_path / "pipeline.yaml"
    compiler.Compiler().compile(build_pipeline("registry.example/kdp:1.2.3"), str(path))
    spec = yaml.safe_load(path.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"prepare-data-op", "teacher-op", "assistant-op", "student-op", "student-op-2",
                          "lr-baseline-op", "evaluate-op"}
    assert tasks["student-op"]["inputs"]["artifacts"]["source"]["taskOutputArtifact"]["producerTask"] == "assistant-op"
    assert tasks["student-op-2"]["inputs"]["artifacts"]["source"]["taskOutputArtifact"]["producerTask"] == "teacher-op"
    for name in ("teacher-op", "assistant-op", "student-op", "lr-baseline-op"):
        fingerprint = tasks[name]["inputs"]["parameters"]["data_fingerprint"]["taskOutputParameter"]
        assert fingerprint["producerTask"] == "prepare-data-op"
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example/kdp:1.2.3"}
    commands = " ".join(" ".join(e["container"]["command"]) for e in spec["deploymentSpec"]["executors"].values())
    assert "pip install" not in commands  # install_kfp_package=False: the image brings kfp
    assert spec["root"]["inputDefinitions"]["parameters"]["hr_size"]["defaultValue"] == 64
    assert DEFAULT_IMAGE.count(":") == 1


def test_source_fingerprint_follows_the_code(tmp_path, monkeypatch):
    import pipelines.local as local

    for package in local.PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "pipelines" / "local.py").write_text("x = 1\n")
    monkeypatch.setattr(local, "__file__", str(tmp_path / "pipelines" / "local.py"))
    first = local.source_fingerprint()
    assert local.source_fingerprint() == first
    (tmp_path / "kd_lib" / "loss.py").write_text("y = 2\n")
    assert local.source_fingerprint() != first


def test_the_detection_pipeline_compiles_with_its_stages_wired(tmp_path):
    from pipelines import detection

    path = tmp_path / "detection.yaml"
    compiler.Compiler().compile(detection.build_pipeline("registry.example/kdp:1.2.3"), str(path))
    spec = yaml.safe_load(path.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"prepare-detection-op", "detector-op", "afp-op", "afp-op-2", "detector-op-2",
                          "evaluate-detection-op"}

    def producer(task, artifact):
        return tasks[task]["inputs"]["artifacts"][artifact]["taskOutputArtifact"]["producerTask"]

    def constant(task, name):
        return tasks[task]["inputs"]["parameters"][name]["runtimeValue"]["constant"]

    assert producer("afp-op", "teacher") == producer("afp-op-2", "teacher") == "detector-op"
    assert (constant("afp-op", "method"), constant("afp-op-2", "method")) == ("afp", "msad")
    assert (constant("detector-op", "view"), constant("detector-op-2", "view")) == ("hr", "lr")
    assert [producer("evaluate-detection-op", a) for a in ("teacher", "afp", "msad", "lr_baseline")] == [
        "detector-op", "afp-op", "afp-op-2", "detector-op-2"]
    for name in ("detector-op", "afp-op", "afp-op-2", "detector-op-2"):
        fingerprint = tasks[name]["inputs"]["parameters"]["data_fingerprint"]["taskOutputParameter"]
        assert fingerprint["producerTask"] == "prepare-detection-op"
    assert set(detection.EVALUATED) == {"teacher", "assistant", "student_afp", "msad_teacher", "student_msad",
                                        "lr_baseline"}
