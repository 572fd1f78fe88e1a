"""A trained model as ONNX for a device: export, check in onnxruntime, int8 quantization.

- :func:`export_onnx`: torch's ONNX exporter (``torch.onnx.export(dynamo=True)``,
  opset :data:`OPSET`), one input ``input`` of shape ``(batch, 3, side, side)``
  with a dynamic batch, the weights inside the one file;
- :func:`run_session`: the outputs of an onnxruntime CPU session on a batch;
- :func:`quantize_int8`: onnxruntime's static quantization (QDQ format, int8
  weights per channel, uint8 activations), its activation ranges calibrated
  on the batches given (MinMax);
- :func:`median_ms`: the median time of a call, for latency side by side.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

OPSET = 18
INPUT_NAME = "input"


def export_onnx(model: nn.Module, side: int, path: str, output_names: list[str]) -> None:
    """Write ``model`` (eval mode, CPU) as ONNX to the local ``path``, batch dynamic."""
    example = torch.zeros(2, 3, side, side)
    torch.onnx.export(model.eval(), (example,), path, dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
                      output_names=output_names, dynamic_shapes=({0: torch.export.Dim("batch")},),
                      external_data=False, verbose=False)


def session(path: str) -> ort.InferenceSession:
    """An onnxruntime session on the CPU, one thread per op (as on a small device core, and stable timings)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run_session(sess: ort.InferenceSession, batch: np.ndarray) -> list[np.ndarray]:
    return sess.run(None, {INPUT_NAME: batch.astype(np.float32)})


class _Batches(CalibrationDataReader):
    def __init__(self, batches: Iterable[np.ndarray]):
        self.batches = iter(batches)

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch.astype(np.float32)}


def quantize_int8(fp32_path: str, int8_path: str, calibration: Iterable[np.ndarray]) -> None:
    """Static int8 quantization of ``fp32_path`` into ``int8_path``, calibrated on ``calibration``."""
    with tempfile.TemporaryDirectory() as tmp:
        prepared = os.path.join(tmp, "prepared.onnx")
        quant_pre_process(fp32_path, prepared, skip_symbolic_shape=True)
        quantize_static(prepared, int8_path, _Batches(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def median_ms(call: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``call()`` in milliseconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
