"""Distillation methods: parsing, wiring of every method, the adversarial update, ViT students."""

import copy
import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F

from components import evaluate, student, teacher
from kd_lib.config import ConfigError, from_dict
from kd_lib.distill.methods import METHODS, DistillSettings, build_distiller
from kd_lib.distill.terms import AttentionTransfer, CrossResolutionKD, DecoupledKD, ISRD, LogitKD
from kd_lib.eval.cost import count_gflops
from kd_lib.models import build_classifier, classifier_module_name, input_module_name
from kd_lib.models.store import load_classifier

VIT = "timm:vit_tiny_patch16_224,patch_size=4,img_size=64,depth=1,num_heads=2,embed_dim=32"


def settings(method, **fields):
    config = DistillSettings(method=method, **fields)
    config.validate()
    return config


@pytest.mark.parametrize("method, words", [
    ("fitnets", "'fitnets' is not a method"),
    ("kd+kd", "names a method twice"),
    ("ce+isrd", "ce (cross-entropy alone) combines with nothing"),
    ("kd+dkd", "kd and dkd each carry the logit term"),
    ("tas+crkd", "tas and crkd each carry the logit term"),
])
def test_bad_methods_are_named(method, words):
    with pytest.raises(ConfigError, match=re.escape(words)) as err:
        settings(method)
    assert err.value.field == "method"


def test_method_parts_and_what_they_need():
    assert [m.name for m in settings("tas+at").methods] == ["tas", "at"]
    assert METHODS["tas"].parts == ("kd", "feature", "isrd") and settings("tas+at").needs_assistant
    assert not settings("ce").needs_teacher and not settings("isrd").needs_teacher
    assert settings("kd+isrd").needs_teacher and not settings("kd+isrd").needs_assistant
    with pytest.raises(ConfigError, match="names a method twice"):
        settings("tas+isrd")


# The method table of docs/methods.md: (method, defaults, cross-entropy weight). The values are written out
# here, never read from the code under test, so that changing a default fails this test.
DEFAULTS = [
    ("ce", {}, 1.0),
    ("kd", {"kd_alpha": 0.9, "temperature": 4.0}, 0.1),
    ("dkd", {"dkd_alpha": 1.0, "dkd_beta": 2.0, "temperature": 4.0, "dkd_warmup": 20 / 240}, 1.0),
    ("fitnet", {"fitnet_weight": 100.0, "fitnet_layer": ""}, 1.0),
    ("at", {"at_weight": 1000.0, "at_layers": [], "at_pool": "feature"}, 1.0),
    ("sp", {"sp_weight": 3000.0, "sp_layers": []}, 1.0),
    ("crkd", {"kd_alpha": 0.9, "temperature": 4.0, "crkd_embed_weight": 1.0, "crkd_pair_weight": 25.0,
              "crkd_mmd_weight": 1.0, "crkd_adv_weight": 0.1, "crkd_adv_lr": 2e-4}, 0.1),
    ("isrd", {"isrd_weight": 50.0}, 1.0),
    ("feature", {"feature_weight": 1.0, "feature_layers": []}, 1.0),
    ("tas", {"kd_alpha": 0.9, "temperature": 4.0, "feature_weight": 1.0, "feature_layers": [],
             "isrd_weight": 50.0}, 0.1),
]


def test_the_documented_defaults_and_ce_weights():
    assert sorted(row[0] for row in DEFAULTS) == sorted(METHODS)  # every method in the table, and only those
    defaults = DistillSettings()
    assert defaults.method == "tas"
    for method, values, ce_weight in DEFAULTS:
        assert set(METHODS[method].settings) == set(values), method
        assert {name: getattr(defaults, name) for name in values} == values, method
        assert settings(method).ce_weight == pytest.approx(ce_weight), method
    declared = {name for m in METHODS.values() for name in m.settings}
    assert declared == {f.name for f in dataclasses.fields(DistillSettings)} - {"method"}
    assert settings("crkd", kd_alpha=0.7).ce_weight == pytest.approx(0.3)
    assert settings("at+isrd", kd_alpha=0.7).ce_weight == 1.0  # no Hinton term: CE keeps weight 1


def test_the_built_terms_carry_the_defaults():
    model, teacher_model = build_classifier("resnet18", 3), build_classifier("resnet18", 3)
    task = build_distiller(settings("tas+at"), model, teacher_model, hr_size=32, student_input_size=8, epochs=24)
    terms = {type(term): term for term in task.terms}
    assert task.ce_weight == pytest.approx(0.1)
    assert terms[LogitKD].weights == {"kd": pytest.approx(0.9)} and terms[LogitKD].loss.temperature == 4.0
    assert terms[ISRD].weights == {"isrd": 50.0}
    assert terms[AttentionTransfer].weights == {"at": 1000.0} and terms[AttentionTransfer].loss.pool == "feature"
    dkd = build_distiller(settings("dkd"), model, teacher_model, hr_size=32, student_input_size=8,
                          epochs=24).terms[0]
    assert isinstance(dkd, DecoupledKD) and dkd.warmup == pytest.approx(2.0)  # 1/12 of 24 epochs
    assert (dkd.loss.alpha, dkd.loss.beta, dkd.loss.temperature) == (1.0, 2.0, 4.0)


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    hr = torch.randn(6, 3, 32, 32)
    return hr, F.interpolate(hr, size=8, mode="bilinear", antialias=True), torch.randint(0, 3, (6,))


EXPECTED_TERMS = {  # the values each method's terms report
    "ce": set(), "kd": {"kd"}, "dkd": {"dkd"}, "fitnet": {"fitnet"}, "at": {"at"}, "sp": {"sp"},
    "crkd": {"kd", "embed", "pair", "mmd", "adv", "discriminator"}, "isrd": {"isrd"},
    "feature": {"feature"}, "tas": {"kd", "feature", "isrd"},
}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_the_student_and_never_the_teacher(method, batch):
    torch.manual_seed(0)
    model, teacher_model = build_classifier("resnet18", 3), build_classifier("resnet18", 3)
    frozen = copy.deepcopy(teacher_model.state_dict())
    task = build_distiller(settings(method), model, teacher_model, hr_size=32, student_input_size=8, epochs=2)
    task.train()
    assert task.teacher is None or not task.teacher.training
    loss, terms = task(*batch)
    loss.backward()
    assert set(terms) == {"ce"} | EXPECTED_TERMS[method] and torch.isfinite(loss)
    weighted = sum(w * terms[n] for term in task.terms for n, w in term.weights.items() if w)
    torch.testing.assert_close(loss.detach(), task.ce_weight * terms["ce"] + weighted)
    assert all(p.grad is None for p in teacher_model.parameters())
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    for name, value in teacher_model.state_dict().items():
        torch.testing.assert_close(value, frozen[name], msg=name)  # BatchNorm statistics included


def test_feature_pairing_needs_one_architecture():
    with pytest.raises(ConfigError, match="'layer1' has 64 channels in the student and 256 in the teacher"):
        build_distiller(settings("feature"), build_classifier("resnet18", 3), build_classifier("resnet50", 3),
                        hr_size=32, student_input_size=8)


def test_default_layers_need_a_resnet_or_an_explicit_list():
    with pytest.raises(ConfigError, match="no default feature layers for VisionTransformer") as err:
        build_distiller(settings("at"), build_classifier(VIT, 3), build_classifier("resnet18", 3),
                        hr_size=32, student_input_size=8)
    assert err.value.field == "at_layers"


def test_dkd_warms_up_over_a_fraction_of_the_run(batch):
    task = build_distiller(settings("dkd", dkd_warmup=0.2), build_classifier("resnet18", 3),
                           build_classifier("resnet18", 3), hr_size=32, student_input_size=8, epochs=10).eval()
    values = []
    for progress in (0.0, 1.0, 2.0, 5.0):
        task.set_progress(progress)
        values.append(task(*batch)[1]["dkd"].item())
    assert values[0] == 0.0
    assert values[1] == pytest.approx(values[2] / 2) and values[2] == pytest.approx(values[3])
    with pytest.raises(ConfigError, match="dkd_warmup.*fraction of the run"):
        settings("dkd", dkd_warmup=20.0)


def test_crkd_discriminator_steps_with_its_own_optimizer_only(batch):
    torch.manual_seed(0)
    task = build_distiller(settings("crkd", crkd_adv_lr=1e-2), build_classifier("resnet18", 3),
                           build_classifier("resnet34", 3), hr_size=32, student_input_size=8).train()
    crkd = next(t for t in task.terms if isinstance(t, CrossResolutionKD))
    adversary = crkd.adversary
    discriminator = set(map(id, adversary.parameters()))
    main = task.optimized_parameters()
    assert not discriminator & set(map(id, main))
    assert set(map(id, crkd.adapter.parameters())) <= set(map(id, main))  # 512 -> 512: Identity, no params
    assert {id(p) for group in adversary.optimizer.param_groups for p in group["params"]} == discriminator
    before = copy.deepcopy(adversary.discriminator.state_dict())
    optimizer = torch.optim.SGD(main, lr=0.1)
    loss, _ = task(*batch)
    after_step = copy.deepcopy(adversary.discriminator.state_dict())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(before[n], after_step[n]) for n in before)  # its own step, in the forward
    for name, value in adversary.discriminator.state_dict().items():
        torch.testing.assert_close(value, after_step[name], msg=name)  # the student's step left it alone
    assert all(p.grad is None for p in adversary.parameters())  # the generator loss wrote no gradient
    state = task.trainable_state_dict()
    assert state["adversaries"][0]["state"]  # the discriminator's Adam moments are checkpointed
    task.eval()
    frozen = copy.deepcopy(adversary.discriminator.state_dict())
    task(*batch)
    for name, value in adversary.discriminator.state_dict().items():
        torch.testing.assert_close(value, frozen[name], msg=name)  # no update outside training


def test_timm_architectures_parse_and_run_at_any_size():
    model = build_classifier(VIT, 5)
    assert (input_module_name(model), classifier_module_name(model)) == ("patch_embed.proj", "head")
    for side in (8, 16, 32):
        assert model(torch.randn(2, 3, side, side)).shape == (2, 5)
    assert count_gflops(model, 16) < count_gflops(model, 32)
    with pytest.raises(ValueError, match="unknown timm model 'vit_tiny_patch16_22'.*vit_tiny_patch16_224"):
        build_classifier("timm:vit_tiny_patch16_22", 5)
    with pytest.raises(ValueError, match="'patch_size' is not key=value"):
        build_classifier("timm:vit_tiny_patch16_224,patch_size", 5)
    assert classifier_module_name(build_classifier("timm:resnet18", 5)) == "fc"


@pytest.fixture(scope="module")
def small_teacher(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    teacher.run(from_dict(teacher.TeacherConfig, {"data": prepared, "out": str(out), "arch": "resnet18",
                                                  "epochs": 1, "batch_size": 8, "hr_size": 64,
                                                  "num_workers": 0}))
    return str(out)


@pytest.mark.parametrize("ratio", [4, 2])
def test_a_vit_student_trains_through_isrd_at_16_and_32_px(prepared, small_teacher, tmp_path, ratio):
    out = tmp_path / "vit"
    manifest = student.run(from_dict(student.StudentConfig, {
        "data": prepared, "out": str(out), "arch": VIT, "method": "kd+isrd", "teacher": small_teacher,
        "hr_size": 64, "ratio": ratio, "epochs": 1, "batch_size": 8, "num_workers": 0, "lr": 0.001}))
    assert {"train_kd", "train_isrd"} <= set(manifest["final"])
    model, meta = load_classifier(str(out))
    assert meta["input_size"] == 64 // ratio and meta["arch"] == VIT
    summary = evaluate.run(from_dict(evaluate.EvaluateConfig, {
        "data": prepared, "out": str(tmp_path / "eval"), "hr_size": 64, "ratio": ratio, "latency_repeats": 1,
        "models": {"vit": str(out)}}))
    assert summary["models"][0]["input_size"] == 64 // ratio and summary["models"][0]["gflops"] > 0


def test_the_docs_table_is_written_from_the_registry():
    from pathlib import Path

    from kd_lib.distill.methods import methods_table

    table = methods_table()
    assert table in (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    assert all(f"| `{name}` |" in table for name in METHODS)


def test_a_method_is_its_build_and_one_registration(monkeypatch, capsys):
    """A method registered here, with a term of an existing loss: the student's help lists it, the
    validation takes it (and combines it), and the docs table has its row."""
    from kd_lib.distill.methods import method, methods_table
    from pipelines import cli

    monkeypatch.setattr("kd_lib.distill.methods.METHODS", dict(METHODS))

    @method("throwaway", uses=("temperature",), logit=True)
    def _throwaway(settings, models):
        """Hinton KD at T, alpha 1

        Source: this test."""
        return [LogitKD(1.0, settings.temperature)]

    assert settings("throwaway+isrd").methods[0].name == "throwaway"
    with pytest.raises(ConfigError, match="throwaway and kd each carry the logit term"):
        settings("throwaway+kd")
    model, teacher_model = build_classifier("resnet18", 3), build_classifier("resnet18", 3)
    task = build_distiller(settings("throwaway", temperature=2.0), model, teacher_model, hr_size=32,
                           student_input_size=8)
    [term] = task.terms
    assert isinstance(term, LogitKD) and term.loss.temperature == 2.0 and task.ce_weight == 1.0
    assert "| `throwaway` | Hinton KD at T, alpha 1 | `temperature` 4 | this test. |" in methods_table()
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        cli.main(["stage", "student", "--help"])
    assert re.search(r"--method METHOD .*: ce, kd, .*, tas, throwaway ", capsys.readouterr().out)
