"""How fast are the kd_lib.ops kernels against the PyTorch they replace?

For each operator, on the pipeline's sizes, times a call (forward and
backward where there is a gradient) three ways:

- ``kd_lib op``: the ``kd_lib`` operator, which runs its CUDA kernel on a
  GPU and its PyTorch reference elsewhere (the note says which);
- ``eager``: the pure-PyTorch formula the references are tested against,
  with autograd: ``paired_resize_reference``; ``T^2 * kl_div(log_softmax)``;
  the three means of Gaussian kernel matrices through ``cdist``, one matrix
  per bandwidth;
- ``compiled``: ``torch.compile`` of that formula (default mode).

Each variant's outputs (values and gradients) are first checked once against
the eager variant's; a variant that differs by more than ``TOLERANCE`` of the
output's scale fails the run (exit 1, after writing the table). A timing is
``--calls`` back-to-back calls, measured by CUDA events on a GPU (the
device's own clock: kernels of microseconds are not hidden behind one
launch's overhead and a host round trip) and by ``perf_counter`` on the CPU,
divided by the calls; the table gives the median of ``--repeats`` timings,
the peak memory allocated during a call
(CUDA only), and for the memory-bound operators the achieved bandwidth: the
bytes a call must move at least (each input read once, each output written
once) over its time, against the device's peak (from its memory clock and bus
width, which the CUDA properties give). Writes
``bench/results/ops-<device>.json`` and ``.md`` and prints the table::

    python bench/ops.py                 # on the GPU when there is one, else the CPU
    python bench/ops.py --device cpu    # the CPU columns only
    python bench/ops.py --repeats 20 --calls 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd_lib.ops import extension, kd_loss, multi_bandwidth_mmd2, paired_resize  # noqa: E402
from kd_lib.ops.paired_resize import paired_resize_reference  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TEMPERATURE = 4.0
BANDWIDTH_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
#: largest difference from the eager variant's outputs, relative to each output's largest magnitude
TOLERANCE = 1e-3
#: per device: images (N, side, ratio), KD logits (N, classes), MMD embeddings (N = M, D)
SIZES = {"cuda": {"resize": (256, 224, 4), "kd": (1024, 1000), "mmd": (512, 512)},
         "cpu": {"resize": (32, 224, 4), "kd": (256, 1000), "mmd": (128, 512)}}


@dataclass
class Row:
    op: str
    shape: str
    variant: str
    ms: float | None
    peak_mib: float | None
    gb_per_s: float | None
    peak_fraction: float | None
    error_vs_eager: float
    note: str = ""


def plain_kd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return TEMPERATURE**2 * F.kl_div(F.log_softmax(student / TEMPERATURE, dim=1),
                                     F.log_softmax(teacher / TEMPERATURE, dim=1),
                                     reduction="batchmean", log_target=True)


def plain_mmd2(x: torch.Tensor, y: torch.Tensor, bandwidths: torch.Tensor) -> torch.Tensor:
    def k(a, b):
        d = torch.cdist(a, b).pow(2)
        return torch.exp(-d[None] / (2 * bandwidths.view(-1, 1, 1) ** 2)).mean(dim=0)
    return k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()


def peak_bandwidth(device: torch.device) -> float | None:
    """Bytes per second of the device's memory: 2 (DDR) x clock x bus width."""
    if device.type != "cuda":
        return None
    properties = torch.cuda.get_device_properties(device)
    clock_khz = getattr(properties, "memory_clock_rate", 0)
    bus_bits = getattr(properties, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def tensors(result: object) -> list[torch.Tensor]:
    """The tensors of a call's result, in order."""
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for item in result for t in tensors(item)]


def error_vs(result: object, reference: object) -> float:
    """The largest difference between two results' tensors, each relative to the reference
    tensor's largest magnitude."""
    worst = 0.0
    for value, expected in zip(tensors(result), tensors(reference), strict=True):
        scale = expected.abs().max().item() or 1.0
        worst = max(worst, (value.float() - expected.float()).abs().max().item() / scale)
    return worst


def time_calls(call: Callable[[], object], device: torch.device, calls: int) -> float:
    """Milliseconds per call over ``calls`` back-to-back calls: CUDA events on a GPU, ``perf_counter``
    elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) * 1e3 / calls


def measure(calls: dict[str, Callable[[], object]], device: torch.device, repeats: int, per_timing: int
            ) -> dict[str, tuple[float, float | None, float]]:
    """Per variant: median milliseconds per call after warming up, its peak MiB above what was
    allocated, and its error against the ``eager`` variant's outputs. The variants take turns in
    every repeat, so a noisy machine slows them alike."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    reference = calls["eager"]()
    peaks: dict[str, float | None] = {}
    errors: dict[str, float] = {}
    for name, call in calls.items():
        errors[name] = error_vs(call(), reference)
        for _ in range(3):
            call()
        synchronize()
        peaks[name] = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            call()
            synchronize()
            peaks[name] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(time_calls(call, device, per_timing))
    return {name: (statistics.median(times[name]), peaks[name], errors[name]) for name in calls}


def with_backward(loss_fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> Callable[[], None]:
    """A call of ``loss_fn`` and its backward into the inputs that require a gradient; returns
    the loss and the gradients."""
    wanted = [t for t in inputs if t.requires_grad]

    def call() -> tuple[torch.Tensor, ...]:
        loss = loss_fn(*inputs)
        return (loss.detach(), *torch.autograd.grad(loss, wanted))
    return call


def workloads(device: torch.device) -> list[tuple[str, str, float | None, dict[str, Callable[[], object]]]]:
    """(op, shape, bytes a call moves at least or None, {variant: call})."""
    sizes = SIZES[device.type]
    n, side, ratio = sizes["resize"]
    images = torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8, device=device)
    resize_bytes = images.numel() * (1 + 4 + 4 / ratio**2)

    def resize_reference(batch):
        return paired_resize_reference(batch, ratio, "bilinear", MEAN, STD, torch.float32, False)
    compiled_resize = torch.compile(resize_reference)

    rows, classes = sizes["kd"]
    student = torch.randn(rows, classes, device=device, requires_grad=True)
    teacher = torch.randn(rows, classes, device=device)
    kd_bytes = 5 * student.numel() * 4  # forward reads s, t; backward reads s, t and writes ds

    count, width = sizes["mmd"]
    x = torch.randn(count, width, device=device, requires_grad=True)
    y = (torch.randn(count, width, device=device) + 0.1).requires_grad_()
    bandwidths = torch.tensor(BANDWIDTH_FACTORS, device=device) * (2 * width) ** 0.5

    return [
        ("paired_resize", f"{n}x{side}x{side}x3 uint8, K={ratio}, bilinear -> float32", resize_bytes, {
            "kd_lib op": lambda: paired_resize(images, ratio, "bilinear", MEAN, STD),
            "eager": lambda: resize_reference(images),
            "compiled": lambda: compiled_resize(images)}),
        ("kd_loss fwd+bwd", f"{rows}x{classes}, T={TEMPERATURE:g}", kd_bytes, {
            "kd_lib op": with_backward(lambda s, t: kd_loss(s, t, TEMPERATURE), student, teacher),
            "eager": with_backward(plain_kd, student, teacher),
            "compiled": with_backward(torch.compile(plain_kd), student, teacher)}),
        ("mmd2 fwd+bwd", f"{count}+{count}x{width}, {len(BANDWIDTH_FACTORS)} bandwidths", None, {
            "kd_lib op": with_backward(lambda a, b: multi_bandwidth_mmd2(a, b, bandwidths), x, y),
            "eager": with_backward(lambda a, b: plain_mmd2(a, b, bandwidths), x, y),
            "compiled": with_backward(torch.compile(lambda a, b: plain_mmd2(a, b, bandwidths)), x, y)}),
    ]


def run(device: torch.device, repeats: int, calls: int) -> list[Row]:
    if device.type != "cuda":
        backend = "PyTorch reference: no CUDA device"
    else:
        backend = "CUDA kernel" if extension.load() else "PyTorch reference: the kernels did not load"
    peak = peak_bandwidth(device)
    rows = []
    for op, shape, moved, variants in workloads(device):
        for variant, (ms, peak_mib, error) in measure(variants, device, repeats, calls).items():
            rate = moved / (ms / 1e3) if moved else None
            rows.append(Row(op, shape, variant, ms, peak_mib, rate / 1e9 if rate else None,
                            rate / peak if rate and peak else None, error,
                            backend if variant == "kd_lib op" else ""))
        print(f"{op}: done", file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[Row], device_name: str) -> str:
    def cell(value: float | None, spec: str, unit: str = "") -> str:
        return "–" if value is None else format(value, spec) + unit

    lines = [f"Device: {device_name}", "",
             "| op | shape | variant | ms | speed-up over compiled | peak MiB | GB/s | of peak bandwidth "
             "| error vs eager |",
             "|---|---|---|---|---|---|---|---|---|"]
    compiled = {r.op: r.ms for r in rows if r.variant == "compiled"}
    for r in rows:
        speedup = compiled[r.op] / r.ms if r.ms and compiled.get(r.op) else None
        fraction = r.peak_fraction * 100 if r.peak_fraction is not None else None
        lines.append(f"| {r.op} | {r.shape} | {r.variant} | {cell(r.ms, '.3f')} | {cell(speedup, '.2f', 'x')} | "
                     f"{cell(r.peak_mib, '.1f')} | {cell(r.gb_per_s, '.1f')} | {cell(fraction, '.0f', ' %')}"
                     f"{' (' + r.note + ')' if r.note else ''} | {r.error_vs_eager:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20, help="timings per variant (the median is reported)")
    parser.add_argument("--calls", type=int, default=50, help="back-to-back calls per timing")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    started = time.monotonic()
    rows = run(device, args.repeats, args.calls)
    table = markdown(rows, f"{name} (torch {torch.__version__})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"ops-{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(
        {"device": name, "torch": torch.__version__, "repeats": args.repeats, "calls": args.calls,
         "tolerance": TOLERANCE,
         "peak_bandwidth_gb_per_s": (peak_bandwidth(device) or 0) / 1e9 or None,
         "wall_seconds": time.monotonic() - started, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table)
    print(table)
    wrong = [f"{r.op} {r.variant}: {r.error_vs_eager:.1e}" for r in rows if not r.error_vs_eager <= TOLERANCE]
    if wrong:
        print(f"bench/ops.py: outputs differ from eager by more than {TOLERANCE:g} of their scale: "
              f"{'; '.join(wrong)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
