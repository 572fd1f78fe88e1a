"""Torch objects to and from any fsspec URI, atomically and safely; checkpoints that cannot trap.

Loading uses ``weights_only=True``: a checkpoint holds tensors and plain
Python values only, never pickled code. A file that holds anything else is
refused, and the message says so (not torch's hint to load it unsafely).

A training checkpoint ``DIR/last.pt`` is saved by :func:`save_latest`, which
keeps the one before it as ``DIR/previous.pt``:

1. the new state is written to ``next.pt`` (atomically) and read back to check
   that its bytes are the ones written;
2. ``last.pt`` is moved to ``previous.pt``;
3. ``next.pt`` is moved to ``last.pt``.

A stop at any point leaves a readable checkpoint: :func:`load_latest` tries
``last.pt``, then ``next.pt`` (present only between steps 1 and 3, and then
whole), then ``previous.pt``, skipping damaged ones with a warning. When all
that exist are damaged it raises :class:`~kd_lib.errors.CheckpointError`,
which says to run again with ``restart`` (:func:`discard_damaged`).
"""

from __future__ import annotations

import io
import logging
import posixpath
from typing import Any

import torch

from kd_lib.errors import CheckpointError, DataError
from kd_lib.io.fs import exists, filesystem, join, read_bytes, remove, sha256_bytes, write_bytes
from kd_lib.io.manifest import published_uri, read_manifest, read_published

log = logging.getLogger(__name__)

LATEST, NEXT, PREVIOUS = "last.pt", "next.pt", "previous.pt"


def _serialize(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def load_failure(err: Exception) -> tuple[str, bool]:
    """What ``torch.load(weights_only=True)``'s error ``err`` says of a file, in one line without torch's
    advice to load it with ``weights_only=False`` (never to be given), and whether the file is a pickle
    that names Python objects beyond tensors and plain values (refused: loading it could run code)."""
    lines = [line.strip().removeprefix("WeightsUnpickler error:").strip() for line in str(err).splitlines()]
    found = [line for line in lines if line and "weights_only" not in line
             and not line.startswith(("Weights only load failed", "Please file", "Check the documentation"))]
    reason = f"{type(err).__name__}: {found[0].split('. ')[0]}" if found else type(err).__name__
    return reason, "GLOBAL" in reason


def deserialize(data: bytes, uri: str) -> Any:
    """The object in the bytes ``data`` read from ``uri``; :class:`DataError` naming ``uri`` if damaged."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged file
        reason, runs_code = load_failure(err)
        if runs_code:
            raise DataError(f"{uri}: holds pickled Python objects, not only tensors and plain values; refused "
                            "(loading it could run code): rewrite it with the stage that made it") from None
        raise DataError(f"{uri}: not a readable checkpoint ({reason})") from None


def save(obj: Any, uri: str) -> None:
    write_bytes(uri, _serialize(obj))


def load(uri: str) -> Any:
    return deserialize(read_bytes(uri), uri)


def load_published(out: str, name: str) -> Any:
    """The object in the published file ``name`` of the stage output ``out``, its SHA-256 checked
    against the manifest (:func:`~kd_lib.io.manifest.read_published`)."""
    manifest = read_manifest(out)
    return deserialize(read_published(out, name, manifest, check_hash=True), published_uri(out, name, manifest))


def _sibling(uri: str, name: str) -> str:
    return join(uri.rsplit("/", 1)[0], name) if "/" in uri else name


def save_latest(obj: Any, uri: str) -> None:
    """Save ``obj`` as the checkpoint ``uri`` (``DIR/last.pt``), keeping the one it replaces as
    ``DIR/previous.pt`` (module docstring)."""
    data = _serialize(obj)
    new, previous = _sibling(uri, NEXT), _sibling(uri, PREVIOUS)
    write_bytes(new, data)
    written = read_bytes(new)
    if sha256_bytes(written) != sha256_bytes(data):
        remove(new)
        raise CheckpointError(f"{new}: reads back other bytes than were written; the checkpoint {uri} is "
                              "unchanged: check the storage")
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.mv(path, filesystem(previous)[1])
    fs.mv(filesystem(new)[1], path)


def candidates(uri: str) -> list[str]:
    """The checkpoint files of ``uri`` (``DIR/last.pt``) that exist, newest first."""
    return [c for c in (uri, _sibling(uri, NEXT), _sibling(uri, PREVIOUS)) if exists(c)]


def load_latest(uri: str) -> tuple[Any, str] | None:
    """The newest readable checkpoint of ``uri`` (``DIR/last.pt``) and the file it was read from
    (an earlier one when ``last.pt`` is damaged), or None when there is none.

    Raises:
        CheckpointError: checkpoints exist but none is readable (the message names them and says
            how to start over).
    """
    found = candidates(uri)
    failures = []
    for candidate in found:
        try:
            state = load(candidate)
        except DataError as err:
            failures.append(str(err))
            log.warning("%s; trying an earlier checkpoint", err)
            continue
        return state, candidate
    if failures:
        raise CheckpointError(f"{'; '.join(failures)}: no readable checkpoint to resume from; run again with "
                              "--restart to start this training over (the damaged checkpoints are removed)")
    return None


def discard_damaged(folder: str) -> list[str]:
    """Remove the unreadable checkpoint files under ``folder`` (any depth); returns their URIs."""
    fs, path = filesystem(folder)
    if not fs.exists(path):
        return []
    removed = []
    for found in sorted(fs.find(path)):
        if found.rsplit("/", 1)[-1] in (LATEST, NEXT, PREVIOUS):
            uri = join(folder, posixpath.relpath(found, path))
            try:
                load(uri)
            except DataError as err:
                log.warning("%s: removed (restart)", err)
                remove(uri)
                removed.append(uri)
    return removed
