"""Where a model starts from: random, torchvision or timm weights, or a file.

A weights string is one of:

- ``""``: random initialisation;
- ``torchvision:NAME`` (``torchvision:DEFAULT``, ``torchvision:IMAGENET1K_V1``):
  the architecture's torchvision weights enum (``torchvision.models.get_model_weights``),
  read from the torch hub cache, ``$TORCH_HOME/hub/checkpoints/<file>``. Nothing is
  downloaded: a missing cache file is an error that names it;
- ``timm:TAG`` or ``timm:TAG,file=PATH`` (``TAG`` may be empty): timm's own
  pretrained mechanism for the architecture ``NAME.TAG``, with
  ``pretrained_cfg_overlay=dict(file=PATH)`` for a local file;
- a URI (path, ``gs://``, ``memory://``) of a project model folder or its
  ``model.pt``, of a plain ``state_dict`` file, or of a ``.safetensors`` file.
  Files are read with ``torch.load(weights_only=True)`` or safetensors, never
  unpickled: a pickle that would run code is refused.

Loading is strict, and reported (:class:`LoadReport`): every tensor of the
model must come from the file with its shape, except the classifier head (the
last ``nn.Linear``), which is re-initialised when its class count differs
(fine-tuning on new classes). Any other missing, unexpected or mis-shaped
tensor is an error that names it. A detector's backbone takes a
classification checkpoint's trunk (or another detector's backbone): the
classifier head and everything else outside the backbone are skipped, and
the report says so.

Fine-tuning (:func:`lr_scales`): the tensors taken from ``weights`` train at
``weights_lr_scale x lr`` and the rest (a new head, the FPN, the detection
head) at ``lr``, the discriminative learning rate of transfer learning
(Howard & Ruder, ULMFiT, ACL 2018; the backbone/head split of the usual
fine-tuning recipes).
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torchvision

from kd_lib.errors import KDError
from kd_lib.io.checkpoint import load_failure
from kd_lib.io.fs import exists, join, listing_fingerprint, read_bytes
from kd_lib.io.manifest import MANIFEST, published_uri, read_manifest, read_published
from kd_lib.models.backbones import (TIMM_PREFIX, build_classifier, build_timm, classifier_module_name,
                                     parse_timm_arch, timm_pretrained)

log = logging.getLogger(__name__)

TORCHVISION_PREFIX = "torchvision:"
MODEL_FILE = "model.pt"
#: Where a detector keeps its backbone, whose names are the classifier's trunk names.
DETECTOR_BODY = "backbone.pyramid.body"
#: Prefixes a classification trunk may carry in a file, tried in this order against a detector's body
#: (a MobileNet's body is its ``features``; a detector's ``model.pt`` keeps its body under DETECTOR_BODY).
TRUNK_PREFIXES = ("", "features.", f"{DETECTOR_BODY}.")


class WeightsError(KDError, ValueError):
    """Weights that cannot be used; the message names the file, tensor or cache entry."""


@dataclass
class LoadReport:
    """What a load took: ``source`` (the weights string), the tensors ``taken``, the model's tensors
    ``reinitialized`` (a head of another class count) and the file's tensors ``skipped``, with why."""

    source: str
    taken: list[str] = field(default_factory=list)
    reinitialized: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        text = f"{self.source}: {len(self.taken)} tensors taken"
        if self.reinitialized:
            text += f"; re-initialized {', '.join(self.reinitialized)} ({next(iter(self.reinitialized.values()))})"
        if self.skipped:
            reasons = sorted(set(self.skipped.values()))
            text += f"; skipped {len(self.skipped)} ({'; '.join(reasons)})"
        return text

    def as_dict(self) -> dict:
        return {"source": self.source, "taken": len(self.taken), "reinitialized": self.reinitialized,
                "skipped": self.skipped}


def started_from(weights: str) -> str:
    """What a model started from, in words: ``random`` or the weights string."""
    return weights or "random"


def is_uri(weights: str) -> bool:
    return bool(weights) and not weights.startswith((TORCHVISION_PREFIX, TIMM_PREFIX))


def weights_fingerprint(weights: str) -> str:
    """What identifies the weights for a stage key: a URI's listing fingerprint (path, size,
    version of each file), else the string itself (an enum or a timm tag names fixed weights)."""
    if not is_uri(weights):
        return weights
    try:
        return listing_fingerprint(weights)
    except FileNotFoundError:
        raise WeightsError(f"weights: {weights} does not exist: give a model folder, a state dict or a "
                           ".safetensors file") from None


def _read_torch(uri: str, data: bytes) -> dict:
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # an unpickling error, or a damaged file
        reason, runs_code = load_failure(err)
        if runs_code:
            raise WeightsError(f"{uri}: refused: a pickle of Python objects, not only tensors and plain values "
                               f"(loading it could run code: {reason})") from None
        raise WeightsError(f"{uri}: refused: not a readable state dict, model.pt or .safetensors file "
                           f"({reason})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{uri}: not a state dict (a mapping of tensor names to tensors, or a project "
                           "model.pt)")
    return obj


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """The tensors of a project model folder or ``model.pt``, a ``state_dict`` file or a
    ``.safetensors`` file at ``uri``."""
    folder = not uri.endswith((".pt", ".pth", ".bin", ".safetensors"))
    if folder and exists(join(uri, MANIFEST)):
        manifest = read_manifest(uri)  # a stage's output: its model.pt, checked against its manifest
        uri, data = published_uri(uri, MODEL_FILE, manifest), read_published(uri, MODEL_FILE, manifest, True)
    else:
        uri = join(uri, MODEL_FILE) if folder and exists(join(uri, MODEL_FILE)) else uri
        data = read_bytes(uri)
    if uri.endswith(".safetensors"):
        from safetensors.torch import load

        try:
            return load(data)
        except Exception as err:
            raise WeightsError(f"{uri}: not a readable safetensors file ({err})") from None
    return _read_torch(uri, data)


def torchvision_state_dict(arch: str, name: str) -> dict[str, torch.Tensor]:
    """torchvision's weights ``name`` of ``arch`` (an enum member, or ``DEFAULT``), from the hub cache."""
    try:
        enum = torchvision.models.get_model_weights(arch)
    except ValueError:
        raise WeightsError(f"torchvision:{name}: {arch!r} is not a torchvision model with weights") from None
    try:
        weights = enum[name]
    except KeyError:
        raise WeightsError(f"torchvision:{name}: {enum.__name__} has no member {name!r}; choose one of "
                           f"DEFAULT, {', '.join(w.name for w in enum)}") from None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.isfile(path):
        raise WeightsError(f"torchvision:{name}: {path} is missing and nothing is downloaded at run time: put "
                           f"{weights.url} there (the torch hub cache under TORCH_HOME="
                           f"{os.environ.get('TORCH_HOME', '~/.cache/torch')})")
    with open(path, "rb") as f:
        return _read_torch(path, f.read())


def parse_timm_weights(weights: str) -> tuple[str, dict]:
    """``timm:TAG[,file=PATH]`` -> ``(TAG, pretrained_cfg_overlay)``."""
    tag, *pairs = weights[len(TIMM_PREFIX):].split(",")
    overlay = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if key.strip() != "file" or not sep:
            raise WeightsError(f"{weights}: expected timm:TAG or timm:TAG,file=PATH, got {pair!r}")
        overlay["file"] = value.strip()
    return tag.strip(), overlay


def timm_state_dict(arch: str, weights: str) -> dict[str, torch.Tensor]:
    """The weights timm's pretrained mechanism loads into ``arch`` (``timm:NAME,...``), at the
    pretrained class count (so that the head can be compared)."""
    if not arch.startswith(TIMM_PREFIX):
        raise WeightsError(f"{weights}: timm weights need a timm architecture (timm:NAME), not {arch!r}")
    tag, overlay = parse_timm_weights(weights)
    if overlay and not os.path.isfile(overlay["file"]):
        raise WeightsError(f"{weights}: no such file {overlay['file']}")
    name, _ = parse_timm_arch(arch)
    try:
        model = build_timm(arch, None, name=f"{name}.{tag}" if tag else name, pretrained=True,
                           pretrained_cfg_overlay=overlay or None)
    except (RuntimeError, OSError, ValueError) as err:
        raise WeightsError(f"{weights}: timm could not load the pretrained weights of {name} ({err}); nothing "
                           "is downloaded at run time: give a local file with timm:TAG,file=PATH") from None
    return model.state_dict()


def read_weights(weights: str, arch: str) -> dict[str, torch.Tensor]:
    """The state dict that ``weights`` (module docstring) names for the architecture ``arch``."""
    if weights.startswith(TORCHVISION_PREFIX):
        if arch.startswith(TIMM_PREFIX):
            raise WeightsError(f"{weights}: torchvision weights need a torchvision architecture, not {arch!r}")
        return torchvision_state_dict(arch, weights[len(TORCHVISION_PREFIX):])
    if weights.startswith(TIMM_PREFIX):
        return timm_state_dict(arch, weights)
    return read_state_dict(weights)


def _shape_error(source: str, name: str, found: torch.Size, wanted: torch.Size) -> WeightsError:
    return WeightsError(f"{source}: tensor {name!r} has shape {tuple(found)}, the model's has {tuple(wanted)}: "
                        "the file is another architecture")


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                     head: str | None = None, skipped: dict[str, str] | None = None) -> LoadReport:
    """Load ``state`` into ``model`` strictly, the ``head`` module's tensors excepted (see the
    module docstring); ``skipped`` lists file tensors set aside already, with why."""
    own = model.state_dict()
    report = LoadReport(source, skipped=dict(skipped or {}))
    head_names = {n for n in own if head and n.startswith(f"{head}.")}
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise WeightsError(f"{source}: tensor {unexpected[0]!r} (and {len(unexpected) - 1} more) is not in the "
                           "model: the file is another architecture")
    missing = sorted(n for n in set(own) - set(state) - head_names if not n.endswith("num_batches_tracked"))
    if missing:
        raise WeightsError(f"{source}: the model's tensor {missing[0]!r} (and {len(missing) - 1} more) is not in "
                           "the file: the file is another architecture")
    new = dict(own)
    reset = [n for n in sorted(head_names) if n not in state or state[n].shape != own[n].shape]
    for name, tensor in state.items():
        if name in head_names and reset:
            continue
        if tensor.shape != own[name].shape:
            raise _shape_error(source, name, tensor.shape, own[name].shape)
        new[name] = tensor
        report.taken.append(name)
    if reset:
        found = state.get(f"{head}.weight")
        count = f"{found.shape[0]} classes in the file, {own[f'{head}.weight'].shape[0]} here" \
            if found is not None else "not in the file"
        report.reinitialized = {n: f"classifier head: {count}" for n in reset}
        report.skipped.update({n: "classifier head of another class count" for n in head_names & set(state)})
    model.load_state_dict(new)
    log.info("weights %s", report.summary())
    return report


def load_classifier_weights(model: nn.Module, arch: str, weights: str) -> LoadReport:
    """Load ``weights`` into the classifier ``model`` of architecture ``arch``; its head is re-initialised
    if the class count differs."""
    return apply_state_dict(model, read_weights(weights, arch), weights, head=classifier_module_name(model))


def resolved_weights(arch: str, weights: str) -> str:
    """``weights``, or ``timm:`` (timm's default pretrained tag) for a ``timm:NAME,pretrained=True`` arch."""
    return weights or (TIMM_PREFIX if timm_pretrained(arch) else "")


def start_classifier(arch: str, num_classes: int, weights: str) -> tuple[nn.Module, LoadReport | None]:
    """The classifier ``arch`` with ``num_classes`` outputs started from ``weights`` (``""``: random),
    and the load's report (None when random)."""
    model = build_classifier(arch, num_classes)
    weights = resolved_weights(arch, weights)
    return model, load_classifier_weights(model, arch, weights) if weights else None


def load_backbone_weights(detector: nn.Module, backbone: str, weights: str) -> LoadReport:
    """Load ``weights`` (a classification checkpoint's trunk, or a detector's) into the backbone
    of ``detector``, whose backbone architecture is ``backbone``."""
    body = detector.get_submodule(DETECTOR_BODY)
    own = set(body.state_dict())
    state = read_weights(weights, backbone)
    prefix = max(TRUNK_PREFIXES, key=lambda p: sum(k[len(p):] in own for k in state if k.startswith(p)))
    trunk = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix):] in own}
    skipped = {k: "not part of the detector's backbone" for k in state
               if not (k.startswith(prefix) and k[len(prefix):] in own)}
    report = apply_state_dict(body, trunk, weights, skipped=skipped)
    report.taken = [f"{DETECTOR_BODY}.{name}" for name in report.taken]
    return report


def lr_scales(model: nn.Module, report: LoadReport | None, scale: float) -> dict[int, float]:
    """Parameter id -> lr factor: ``scale`` for the parameters of ``model`` taken from the weights,
    nothing for the others (they train at the full lr). Empty when nothing was loaded."""
    if report is None or scale == 1:
        return {}
    taken = set(report.taken)
    return {id(p): scale for name, p in model.named_parameters() if name in taken}
