"""Torch objects to and from any fsspec URI, atomically and safely.

Loading uses ``weights_only=True``: a checkpoint holds tensors and plain
Python values only, never pickled code.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from kd_lib.io.fs import read_bytes, write_bytes


def save(obj: Any, uri: str) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(uri, buffer.getvalue())


def load(uri: str) -> Any:
    data = read_bytes(uri)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged file
        raise ValueError(f"{uri}: not a readable checkpoint ({err})") from err
