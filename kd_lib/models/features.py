"""Reading intermediate features of a model through forward hooks."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle


class FeatureCapture(Mapping[str, Any]):
    """Keeps the latest output of each named module of ``model``, by forward hooks.

    The model's forward is left as it is: a hook on each named module stores
    the module's output (graph attached, so losses on it reach the model)
    under its name. A module that runs more than once in a forward keeps its
    last output. The capture is a read-only mapping from name to output::

        with FeatureCapture(model, ["conv1", "layer4"]) as feats:
            logits = model(x)
            feats["conv1"]  # the conv1 output, before BN and ReLU

    With ``inputs=True`` a pre-hook keeps each module's first positional
    *input* instead (for example the embedding that enters a classifier).

    Leaving the ``with`` block, or ``close()``, removes the hooks; the outputs
    already captured stay readable.

    Raises:
        ValueError: a name is not in ``model.named_modules()``; the message
            lists the unknown names and close matches.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], inputs: bool = False) -> None:
        modules = dict(model.named_modules())
        unknown = [name for name in names if name not in modules]
        if unknown:
            raise ValueError(_unknown_names_message(unknown, list(modules)))
        self._outputs: dict[str, Any] = {}
        self._handles: list[RemovableHandle] = [
            modules[name].register_forward_pre_hook(self._store_input(name)) if inputs
            else modules[name].register_forward_hook(self._store_output(name))
            for name in dict.fromkeys(names)
        ]

    def _store_output(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            self._outputs[name] = output

        return hook

    def _store_input(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            self._outputs[name] = inputs[0]

        return hook

    def __getitem__(self, name: str) -> Any:
        if name not in self._outputs:
            raise KeyError(f"no output captured for {name!r}: run a forward of the model first")
        return self._outputs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._outputs)

    def __len__(self) -> int:
        return len(self._outputs)

    def close(self) -> None:
        """Remove the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> FeatureCapture:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _unknown_names_message(unknown: Sequence[str], known: Sequence[str]) -> str:
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=3)
        parts.append(f"{name!r} (close matches: {', '.join(close) or 'none'})")
    return "unknown module names: " + "; ".join(parts)


def feature_shapes(
    model: nn.Module, names: Sequence[str], input_size: int
) -> dict[str, torch.Size]:
    """The ``(C, H, W)`` of each named module's output for a ``3 x input_size x input_size`` input.

    One forward of a zero batch of 1, in eval mode (so BatchNorm accepts a
    batch of 1 and its running statistics stay untouched) under ``no_grad``,
    on the model's device and dtype; the model's training flag is restored.
    Used to size decoders such as :class:`kd_lib.models.isrd.ISRDDecoder`.

    Raises:
        ValueError: unknown names (from :class:`FeatureCapture`).
        TypeError: a named module's output is not a tensor.
    """
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.get_default_dtype()
    x = torch.zeros(1, 3, input_size, input_size, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with FeatureCapture(model, names) as feats, torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
    shapes = {}
    for name in names:
        output = feats[name]
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"output of {name!r} is a {type(output).__name__}, not a tensor")
        shapes[name] = output.shape[1:]
    return shapes
