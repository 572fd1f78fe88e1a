"""A trained classifier on disk: ``model.pt`` with its architecture and labels.

The file holds the state dict and what is needed to rebuild and use the
model: ``arch``, ``classes`` (label order), ``input_size`` (the side of the
images it was trained on), plus free-form ``info``. Nothing pickled but
tensors and plain values.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from kd_lib.errors import ModelKindError
from kd_lib.io import checkpoint
from kd_lib.io.fs import join
from kd_lib.models.backbones import build_classifier

MODEL_FILE = "model.pt"


def save_classifier(out: str, model: nn.Module, *, arch: str, classes: list[str], input_size: int,
                    **info: Any) -> str:
    uri = join(out, MODEL_FILE)
    checkpoint.save({"arch": arch, "classes": classes, "input_size": input_size, "info": info,
                     "state_dict": model.state_dict()}, uri)
    return uri


def load_classifier(out: str) -> tuple[nn.Module, dict[str, Any]]:
    """The model stored under the stage output ``out`` and its metadata (in eval mode, on CPU)."""
    state = checkpoint.load_published(out, MODEL_FILE)
    if "arch" not in state:
        raise ModelKindError(f"{out} holds a {'detector' if 'spec' in state else 'model'}, not a classifier: "
                             "give the output of a classification stage")
    model = build_classifier(state["arch"], len(state["classes"]))
    model.load_state_dict(state.pop("state_dict"))
    return model.eval(), state
