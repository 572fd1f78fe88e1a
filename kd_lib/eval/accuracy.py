"""Top-k accuracy of a classifier on the HR or the LR view of a validation set."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm

from kd_lib.engine.loop import paired_batches

VIEWS = ("hr", "lr")


def topk_correct(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the ``k`` highest logits, for each ``k`` in ``ks``.

    A sample of label ``y`` counts for ``k`` when
    ``#{j != y : logits[j] >= logits[y]} < min(k, C)``, with ``C`` the number
    of classes. So:

    * ``k`` is capped at ``C``: with 3 classes, top-5 equals top-3 (every
      sample with a non-NaN label logit counts);
    * ties count against the sample: a class tied with the label takes the
      better rank, so a model emitting constant logits scores 0 top-1 rather
      than an arbitrary tie-break;
    * a NaN label logit never counts.

    The result is keyed by the requested ``k`` (not the capped one).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(
            f"labels must be (N,) with N={logits.shape[0]}, got shape {tuple(labels.shape)}"
        )
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got ks={tuple(ks)}")
    num_classes = logits.shape[1]
    labels = labels.to(device=logits.device, dtype=torch.long)
    label_logit = logits.gather(1, labels[:, None])
    others = torch.ones_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], False)
    rank = ((logits >= label_logit) & others).sum(dim=1)
    valid = ~torch.isnan(label_logit[:, 0])
    return {k: int(((rank < min(k, num_classes)) & valid).sum()) for k in ks}


def evaluate_classifier(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    pairing: Callable[[Tensor], tuple[Tensor, Tensor]],
    view: str,
    device: torch.device | str,
) -> dict[str, float | int]:
    """Top-1 and top-5 accuracy of ``model`` over ``loader`` on one input view.

    ``loader`` yields ``(images, labels)`` batches, the images uint8
    ``(N, H, W, 3)``; each is moved to ``device`` and made into its HR and LR
    batches there by ``pairing`` (the dataset's
    :class:`~kd_lib.data.transforms.PairedResize`, see
    :func:`kd_lib.engine.loop.paired_batches`); ``view`` ("hr" or "lr") picks
    the input. ``model`` must already be on ``device``; it runs in eval
    mode under ``torch.inference_mode()`` and gets its training flag back
    afterwards. Returns ``{"top1": correct_1 / count, "top5": correct_5 /
    count, "count": count}``; top-5 is capped at the number of classes (see
    :func:`topk_correct`).
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got view={view!r}")
    was_training = model.training
    model.eval()
    correct = {1: 0, 5: 0}
    count = 0
    try:
        with torch.inference_mode():
            bar = tqdm(loader, desc=f"eval {view}", unit="batch", leave=False, file=sys.stderr,
                       disable=None)  # no bar where stderr is not a terminal (logs)
            for hr, lr, labels in paired_batches(bar, pairing, device):
                logits = model(hr if view == "hr" else lr)
                for k, n in topk_correct(logits, labels, ks=(1, 5)).items():
                    correct[k] += n
                count += labels.shape[0]
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("loader yielded no samples")
    return {"top1": correct[1] / count, "top5": correct[5] / count, "count": count}


def classifier_validation(val_set, view: str, num_workers: int = 0, batch_size: int = 256):
    """A ``validate(model, device)`` callable for the training loop: top-1 and top-5 on ``view``.

    ``val_set`` is a :class:`~kd_lib.data.shards.ShardedImageDataset`: uint8
    crops and labels, paired on the device by its ``pairing``.
    """
    loader = torch.utils.data.DataLoader(val_set, batch_size=batch_size, num_workers=num_workers)

    def validate(model: nn.Module, device: torch.device) -> dict[str, float]:
        result = evaluate_classifier(model, loader, val_set.pairing, view, device)
        return {"top1": result["top1"], "top5": result["top5"]}

    return validate
