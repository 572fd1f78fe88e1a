"""Verdicts: does each model beat the model it must beat, by more than the noise of the val split?

Over a classification summary (:mod:`kd_lib.eval.report`), whose models may
carry ``stage`` (the stage that trained them) and ``distilled_from`` (the name
of the evaluated model they learned from), the comparisons are:

- each HR model (the teacher, the assistant) against the LR baseline: it must
  know more than the LR model alone learns, or distilling from it cannot help;
- each other LR model (a student) against the LR baseline, and against the
  model it was distilled from.

The LR baseline is the model trained by the ``lr-baseline`` stage (or named
``lr_baseline``). Top-1 on a validation split of ``n`` images is a binomial
proportion: its standard error is ``sqrt(p (1 - p) / n)``, and that of the
difference of two models' top-1 ``sqrt(se_a^2 + se_b^2)`` (the two models'
errors taken as independent). A difference under two standard errors (about
a 95 % interval) is "within noise", as in ``bench/quality.py``.

The same module decides the pipeline's teacher gate (:func:`teacher_gate`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

Summary = dict[str, Any]
Model = dict[str, Any]
Outcome = Literal["better", "worse", "within noise"]

BASELINE_STAGE, BASELINE_NAME = "lr-baseline", "lr_baseline"
#: ``min_teacher_margin`` of a gate that lets every teacher through: a top-1 difference is at
#: least -100 points.
GATE_OFF = -100.0
ADVICE = ("train it longer (more epochs), with a higher lr, or from pretrained weights")


def standard_error(p: float, n: int) -> float:
    """Standard error of a top-1 fraction ``p`` measured on ``n`` images: ``sqrt(p (1 - p) / n)``."""
    if n < 1:
        raise ValueError(f"the validation split must have at least one image, got {n}")
    return math.sqrt(p * (1 - p) / n)


def two_standard_errors(p: float, q: float, n: int) -> float:
    """Two standard errors of ``p - q``, two top-1 fractions each measured on the same ``n``
    images: ``2 sqrt(p (1 - p) / n + q (1 - q) / n)``."""
    return 2 * math.hypot(standard_error(p, n), standard_error(q, n))


@dataclass(frozen=True)
class Verdict:
    """``model`` against ``reference``: their top-1 (fractions) and two standard errors of the
    difference (a fraction)."""

    model: str
    reference: str
    model_top1: float
    reference_top1: float
    noise: float

    @property
    def difference(self) -> float:
        return self.model_top1 - self.reference_top1

    @property
    def outcome(self) -> Outcome:
        if abs(self.difference) < self.noise:
            return "within noise"
        return "better" if self.difference > 0 else "worse"

    def text(self) -> str:
        """``teacher vs lr_baseline: 25.50 % vs 36.33 %, -10.83 points: worse (2 SE 5.55)``."""
        return (f"{self.model} vs {self.reference}: {100 * self.model_top1:.2f} % vs "
                f"{100 * self.reference_top1:.2f} %, {100 * self.difference:+.2f} points: {self.outcome} "
                f"(2 SE {100 * self.noise:.2f})")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "difference": self.difference, "outcome": self.outcome, "text": self.text()}


def compare(model: Model, reference: Model, val_images: int) -> Verdict:
    """:class:`Verdict` of ``model`` against ``reference`` on ``val_images`` images."""
    return Verdict(model["name"], reference["name"], model["top1"], reference["top1"],
                   two_standard_errors(model["top1"], reference["top1"], val_images))


def _is_baseline(model: Model) -> bool:
    return model.get("stage", BASELINE_STAGE if model["name"] == BASELINE_NAME else "") == BASELINE_STAGE


def verdicts(summary: Summary) -> list[Verdict]:
    """Every comparison of the module docstring, in summary order; none for a detection
    summary (COCO AP is no binomial proportion) or one without an LR baseline."""
    if summary.get("task", "classification") != "classification":
        return []
    models = summary["models"]
    baseline = next((m for m in models if _is_baseline(m)), None)
    if baseline is None:
        return []
    by_name = {m["name"]: m for m in models}
    n = summary["dataset"]["val_images"]
    found = []
    for model in models:
        if model is baseline:
            continue
        found.append(compare(model, baseline, n))
        source = by_name.get(model.get("distilled_from") or "")
        if source is not None and model["input_size"] < summary["hr_size"]:
            found.append(compare(model, source, n))
    return found


def advice(summary: Summary, found: list[Verdict]) -> list[str]:
    """What to try for each HR model that does not beat the LR baseline (worse or within noise)."""
    hr = {m["name"]: m for m in summary["models"] if m["input_size"] >= summary["hr_size"]}
    baseline = next((m["name"] for m in summary["models"] if _is_baseline(m)), None)
    return [f"{v.model} does not beat the LR baseline, so distilling from it cannot be expected to help: "
            f"{ADVICE} (kdp run --set {hr[v.model].get('stage', v.model)}.epochs=N, "
            f"--set {hr[v.model].get('stage', v.model)}.lr=X)"
            for v in found if v.model in hr and v.reference == baseline and v.outcome != "better"]


def with_verdicts(summary: Summary) -> Summary:
    """``summary`` with ``verdicts`` (each :meth:`Verdict.as_dict`) and ``advice`` added."""
    found = verdicts(summary)
    return {**summary, "verdicts": [v.as_dict() for v in found], "advice": advice(summary, found)}


def verdict_lines(summary: Summary) -> list[str]:
    """The lines printed under the results table: the gate's message where the gate stopped
    the run, each verdict, and the advice."""
    gate = summary.get("gate") or {}
    stopped = [f"gate: {gate['message']}"] if gate and not gate["passed"] else []
    return [*stopped, *(v["text"] for v in summary.get("verdicts", [])), *summary.get("advice", [])]


def teacher_gate(teacher_top1: float, baseline_top1: float, min_margin: float = GATE_OFF) -> dict[str, Any]:
    """Does the teacher beat the LR baseline by at least ``min_margin`` points of top-1?

    Returns ``{"passed", "teacher_top1", "baseline_top1", "margin", "min_teacher_margin",
    "message"}``, top-1 as fractions and margins in points; :data:`GATE_OFF` passes
    every teacher.
    """
    margin = round(100 * (teacher_top1 - baseline_top1), 9)  # 100 * (0.5 - 0.4) is 9.999999999999998
    passed = margin >= min_margin
    figures = (f"the teacher's top-1 {100 * teacher_top1:.2f} % is {margin:+.2f} points from the LR "
               f"baseline's {100 * baseline_top1:.2f} %")
    if min_margin <= GATE_OFF:
        message = f"{figures} (gate off)"
    elif passed:
        message = f"{figures}, at least min_teacher_margin {min_margin:g}: the assistant and students run"
    else:
        message = (f"{figures}, under min_teacher_margin {min_margin:g}: the assistant and students are "
                   f"skipped and only the teacher and the LR baseline are evaluated; {ADVICE}")
    return {"passed": passed, "teacher_top1": teacher_top1, "baseline_top1": baseline_top1, "margin": margin,
            "min_teacher_margin": min_margin, "message": message}
