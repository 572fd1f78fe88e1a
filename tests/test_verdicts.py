"""Verdicts over hand-made summaries: below, above and within the noise of the val split."""

import math

import pytest

from kd_lib.eval.verdicts import GATE_OFF, teacher_gate, two_standard_errors, verdict_lines, with_verdicts


def model(name, top1, size, stage, distilled_from=None):
    return {"name": name, "top1": top1, "input_size": size, "stage": stage, "distilled_from": distilled_from}


def summary(*models, val_images=600):
    return {"task": "classification", "hr_size": 64, "ratio": 4, "dataset": {"val_images": val_images},
            "models": list(models)}


def by_pair(checked):
    return {(v["model"], v["reference"]): v for v in checked["verdicts"]}


def test_two_standard_errors_by_hand():
    # p = q = 0.5 on 100 images: each SE 0.05, that of the difference 0.05 * sqrt(2)
    assert two_standard_errors(0.5, 0.5, 100) == pytest.approx(2 * 0.05 * math.sqrt(2))
    assert two_standard_errors(1.0, 0.0, 10) == 0.0
    with pytest.raises(ValueError, match="at least one image"):
        two_standard_errors(0.5, 0.5, 0)


def test_a_teacher_below_the_baseline_is_worse_and_gets_advice():
    # a run where the HR models never beat the 16 px baseline (600 val images: 2 SE about 5.3 points)
    checked = with_verdicts(summary(model("teacher", 0.255, 64, "teacher"),
                                    model("assistant", 0.3233, 64, "assistant", "teacher"),
                                    model("student", 0.315, 16, "student", "assistant"),
                                    model("student_onestage", 0.3267, 16, "student", "teacher"),
                                    model("lr_baseline", 0.3633, 16, "lr-baseline")))
    table = by_pair(checked)
    assert list(table) == [("teacher", "lr_baseline"), ("assistant", "lr_baseline"), ("student", "lr_baseline"),
                           ("student", "assistant"), ("student_onestage", "lr_baseline"),
                           ("student_onestage", "teacher")]
    teacher = table["teacher", "lr_baseline"]
    assert teacher["outcome"] == "worse" and teacher["difference"] == pytest.approx(-0.1083)
    assert teacher["noise"] == pytest.approx(two_standard_errors(0.255, 0.3633, 600))
    assert teacher["text"] == "teacher vs lr_baseline: 25.50 % vs 36.33 %, -10.83 points: worse (2 SE 5.30)"
    assert table["assistant", "lr_baseline"]["outcome"] == "within noise"  # -4.00 points
    assert table["student", "lr_baseline"]["outcome"] == "within noise"  # -4.83 points, 2 SE 5.46
    assert table["student_onestage", "teacher"]["outcome"] == "better"  # +7.17 points
    assert [a.split(" ")[0] for a in checked["advice"]] == ["teacher", "assistant"]  # neither beats it
    assert "--set teacher.epochs=N" in checked["advice"][0] and "pretrained weights" in checked["advice"][0]
    assert verdict_lines(checked) == [v["text"] for v in checked["verdicts"]] + checked["advice"]


def test_models_above_the_baseline_are_better_and_get_no_advice():
    checked = with_verdicts(summary(model("teacher", 0.60, 64, "teacher"),
                                    model("student", 0.52, 16, "student", "teacher"),
                                    model("lr_baseline", 0.40, 16, "lr-baseline")))
    table = by_pair(checked)
    assert table["teacher", "lr_baseline"]["outcome"] == "better"
    assert table["student", "lr_baseline"]["outcome"] == "better"
    assert table["student", "teacher"]["outcome"] == "worse"  # the student keeps 87 % of its teacher
    assert checked["advice"] == []


def test_within_noise_depends_on_the_size_of_the_val_split():
    models = (model("teacher", 0.55, 64, "teacher"), model("lr_baseline", 0.50, 16, "lr-baseline"))
    # 2 SE = 2 sqrt((0.55 * 0.45 + 0.5 * 0.5) / n): 9.97 points at n = 200, 2.00 at n = 5000
    small, large = (by_pair(with_verdicts(summary(*models, val_images=n)))["teacher", "lr_baseline"]
                    for n in (200, 5000))
    assert small["outcome"] == "within noise" and "within noise (2 SE 9.97)" in small["text"]
    assert large["outcome"] == "better"
    assert with_verdicts(summary(*models, val_images=200))["advice"][0].startswith("teacher does not beat")


def test_no_verdicts_without_a_baseline_or_for_detection():
    assert with_verdicts(summary(model("teacher", 0.6, 64, "teacher")))["verdicts"] == []
    detection = summary(model("teacher", 0.3, 64, "detector"), model("lr_baseline", 0.2, 32, "detector"))
    assert with_verdicts({**detection, "task": "detection"})["verdicts"] == []
    # an older summary without stages: the baseline is found by its name
    old = summary({"name": "teacher", "top1": 0.6, "input_size": 64},
                  {"name": "lr_baseline", "top1": 0.4, "input_size": 16})
    assert [v["outcome"] for v in with_verdicts(old)["verdicts"]] == ["better"]


def test_the_teacher_gate():
    below = teacher_gate(0.255, 0.3633, 2.0)
    assert not below["passed"] and below["margin"] == pytest.approx(-10.83)
    assert "under min_teacher_margin 2" in below["message"] and "skipped" in below["message"]
    assert "pretrained weights" in below["message"]
    above = teacher_gate(0.50, 0.40, 10.0)  # exactly the margin passes
    assert above["passed"] and "at least min_teacher_margin 10" in above["message"]
    assert not teacher_gate(0.50, 0.41, 10.0)["passed"]
    off = teacher_gate(0.10, 0.90)  # off by default: even a useless teacher passes
    assert off["passed"] and off["min_teacher_margin"] == GATE_OFF and "(gate off)" in off["message"]
    stopped = {"verdicts": [], "advice": [], "gate": below}
    assert verdict_lines(stopped) == [f"gate: {below['message']}"]
    assert verdict_lines({"verdicts": [], "advice": [], "gate": above}) == []
