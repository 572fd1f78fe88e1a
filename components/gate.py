"""teacher-gate: does the teacher beat the LR baseline by ``min_teacher_margin`` points?

Reads the last epoch's validation top-1 that the teacher and the LR baseline
stages published in their manifests (the same split, at each model's own
input size, that evaluate measures) and decides with
:func:`kd_lib.eval.verdicts.teacher_gate`. The pipeline runs the assistant and
the students only when the gate passes; ``min_teacher_margin`` at
:data:`~kd_lib.eval.verdicts.GATE_OFF` (the default) passes every teacher.
"""

from __future__ import annotations

import sys

from kd_lib.eval.verdicts import GATE_OFF, teacher_gate
from kd_lib.io.manifest import read_manifest


def final_top1(uri: str) -> float:
    """The last epoch's validation top-1 of the training stage output at ``uri``."""
    final = read_manifest(uri).get("final", {})
    if "val_top1" not in final:
        raise ValueError(f"{uri}: the manifest has no final val_top1; is it a classification training output?")
    return final["val_top1"]


def run(teacher: str, lr_baseline: str, min_teacher_margin: float = GATE_OFF) -> dict:
    """The gate's decision (see :func:`~kd_lib.eval.verdicts.teacher_gate`), also printed."""
    decision = teacher_gate(final_top1(teacher), final_top1(lr_baseline), min_teacher_margin)
    print(f"teacher gate: {decision['message']}", file=sys.stderr, flush=True)
    return decision
