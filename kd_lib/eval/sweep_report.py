"""Figures and HTML page of a resolution/model sweep (:mod:`kd_lib.eval.sweep`).

- :func:`front_figure`: top-1 against each cost of :data:`~kd_lib.eval.sweep.COSTS`, one panel each, with
  the Pareto front, the noise of each cell and the choice;
- :func:`inputs_figure`: what the camera would send at each input size, and what each cell predicts
  from it;
- :func:`sweep_html`: both, with the table and the choice, in one self-contained page.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from PIL import Image

from kd_lib.eval.report import dataset_name, html_page
from kd_lib.eval.sweep import (
    COST_NAMES,
    COSTS,
    DOMINATED,
    FRONT,
    WITHIN_NOISE,
    Cell,
    Choice,
    front_status,
    pareto_front,
    table_rows,
)
from kd_lib.io.fs import write_bytes
from kd_lib.ops import downsample

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
RIGHT_COLOR, WRONG_COLOR = "#1a7f37", "#cf222e"
DOMINATED_ALPHA = 0.35
COST_LABELS = {"input_bytes": "input bytes per image (3 \u00d7 px\u00b2, 8-bit)", "gflops": "forward GFLOPs per image",
               "latency_ms": "latency at batch 1 (ms)"}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _styles(cells: Sequence[Cell]) -> dict[str, tuple[str, str]]:
    """Architecture -> (colour, marker), in name order."""
    archs = sorted({c.arch for c in cells})
    return {arch: (f"C{i % 10}", MARKERS[i % len(MARKERS)]) for i, arch in enumerate(archs)}


def _front_panel(ax: Axes, cells: Sequence[Cell], choice: Choice, cost: str,
                 styles: dict[str, tuple[str, str]]) -> None:
    """Top-1 (%) against ``cost`` on a log axis: bars of two SE, front cells filled, cells within noise of
    the front hollow, dominated ones faded; the front as a step line, the chosen (or closest) cell circled."""
    status = front_status(cells, cost)
    archs = list(styles)
    for cell in cells:
        color, marker = styles[cell.arch]
        x, y = cell.cost(cost), 100 * cell.mean
        alpha = DOMINATED_ALPHA if status[cell.key] == DOMINATED else 1.0
        ax.errorbar(x, y, yerr=200 * cell.standard_error, fmt="none", ecolor=color, elinewidth=0.9, capsize=3,
                    alpha=alpha, zorder=2)
        ax.scatter([x], [y], marker=marker, s=55, facecolors="none" if status[cell.key] == WITHIN_NOISE else color,
                   edgecolors=color, linewidths=1.4, alpha=alpha, zorder=3)
        left = archs.index(cell.arch) % 2  # alternate sides, so that two architectures at one cost do not collide
        ax.annotate(f"r{cell.ratio}", (x, y), xytext=(-6 if left else 6, 4), textcoords="offset points",
                    ha="right" if left else "left", fontsize=8, color=color)
    front = pareto_front(cells, cost)
    ax.step([f.cost(cost) for f in front], [100 * f.mean for f in front], where="post", color="0.35", lw=1.0,
            zorder=1)
    for cell, ls in ((choice.cell, "-"), (choice.closest, "--")):
        if cell is not None:
            ax.scatter([cell.cost(cost)], [100 * cell.mean], s=330, facecolors="none", edgecolors="black",
                       linewidths=1.5, linestyles=ls, zorder=4)
    if choice.target is not None:
        ax.axhline(100 * choice.target, color="0.4", ls=":", lw=1.2, zorder=1)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(COST_LABELS[cost])
    ax.set_title(f"against {COST_NAMES[cost]}", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)


def _legend_handles(styles: dict[str, tuple[str, str]], choice: Choice) -> list[Line2D]:
    """One handle per architecture, then the front statuses, the front line, the circle and the target."""
    def marker(label: str, **style: Any) -> Line2D:
        return Line2D([], [], label=label, **{"ls": "none", "markersize": 8, **style})

    handles = [marker(arch, marker=m, color=c) for arch, (c, m) in styles.items()]
    handles += [marker(FRONT, marker="o", color="0.3"),
                marker(WITHIN_NOISE, marker="o", color="0.3", markerfacecolor="none"),
                marker(DOMINATED, marker="o", color="0.3", alpha=DOMINATED_ALPHA),
                Line2D([], [], color="0.35", lw=1.0, label="Pareto front")]
    if choice.cell is not None or choice.closest is not None:
        handles.append(marker("chosen" if choice.met else "closest (budget not met)", marker="o", markersize=16,
                              markerfacecolor="none", markeredgecolor="black"))
    if choice.target is not None:
        handles.append(Line2D([], [], color="0.4", ls=":", lw=1.2, label=f"keep target {100 * choice.target:.2f} %"))
    return handles


def front_figure(cells: Sequence[Cell], choice: Choice, path: str) -> bytes:
    """Write to ``path`` (any URI of :mod:`kd_lib.io.fs`), and return, a PNG of three panels: top-1
    against input bytes, GFLOPs and latency (:func:`_front_panel`), one colour and marker per
    architecture, each cell labelled ``rK`` with its ratio ``K``, the keep target as a dotted line."""
    styles = _styles(cells)
    fig = Figure(figsize=(15, 5.4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(COSTS), sharey=True)
    for ax, cost in zip(axes, COSTS):
        _front_panel(ax, cells, choice, cost, styles)
    axes[0].set_ylabel("top-1 % (bars: \u00b12 SE)")
    fig.suptitle("Top-1 against cost per student architecture and ratio (rK: input side = HR side / K)")
    handles = _legend_handles(styles, choice)
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=9)
    png = _png(fig)
    write_bytes(path, png)
    return png


def _hr_pixels(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """A PIL image or a uint8 ``(H, W, 3)`` tensor (as the loaders ship crops) -> uint8 ``(H, W, 3)``."""
    pixels = torch.from_numpy(np.array(image.convert("RGB"))) if isinstance(image, Image.Image) else image
    if pixels.dtype != torch.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[0] != pixels.shape[1]:
        raise ValueError(f"an HR image must be square uint8 (H, W, 3), got {pixels.dtype} {tuple(pixels.shape)}")
    return pixels


def camera_view(image: torch.Tensor, size: int) -> np.ndarray:
    """The uint8 ``(side, side, 3)`` HR ``image`` as the model at ``size`` px sees it: downsampled by
    ``side // size`` with the project's antialiased bilinear (:func:`kd_lib.ops.downsample`), then
    upscaled back to ``side`` with nearest neighbour, so that each input pixel shows as a block."""
    side = image.shape[0]
    if side % size:
        raise ValueError(f"input size {size} does not divide the HR image's side {side}")
    ratio = side // size
    lr = downsample(image.permute(2, 0, 1)[None].float() / 255, ratio, "bilinear")
    pixels = (lr[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return pixels.repeat(ratio, axis=0).repeat(ratio, axis=1)


def inputs_figure(images: Sequence[Image.Image | torch.Tensor], sizes: Sequence[int],
                  predictions: Mapping[str, Sequence[int]], class_names: Sequence[str], labels: Sequence[int],
                  path: str) -> bytes:
    """Write to ``path``, and return, a PNG of "what the camera would send": one row per HR validation
    image (square, as the eval crop makes them; its true class on the left), one column per input size
    (:func:`camera_view`), each tile titled with its input bytes and captioned with the prediction of each
    cell at that size (``predictions``: ``"arch@ratio"`` -> class index per image), green when right and
    red when wrong."""
    pixels = [_hr_pixels(image) for image in images]
    side = pixels[0].shape[0]
    at_size = {size: sorted(k for k in predictions if side // int(k.rpartition("@")[2]) == size) for size in sizes}
    lines = max((len(keys) for keys in at_size.values()), default=0)
    fig = Figure(figsize=(max(2.4 * len(sizes), 6), len(pixels) * (2.6 + 0.17 * lines)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(pixels), len(sizes), squeeze=False)
    for i, image in enumerate(pixels):
        axes[i][0].set_ylabel(f"true: {class_names[labels[i]]}")
        for ax, size in zip(axes[i], sizes):
            ax.imshow(camera_view(image, size), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{size} px: {3 * size * size:,} B", fontsize=9)
            for line, key in enumerate(at_size[size]):
                guess = predictions[key][i]
                right = guess == labels[i]
                mark = "\u2713" if right else "\u2717"
                ax.annotate(f"{mark} {key.rpartition('@')[0]}: {class_names[guess]}",
                            (0.5, 0), xycoords="axes fraction", xytext=(0, -3 - 11 * line),
                            textcoords="offset points", ha="center", va="top", fontsize=8,
                            color=RIGHT_COLOR if right else WRONG_COLOR)
    fig.suptitle("What the camera would send, at each input size\n(enlarged pixel for pixel; each cell's "
                 "prediction:\ngreen right, red wrong)", fontsize=10)
    png = _png(fig)
    write_bytes(path, png)
    return png


def _html_table(cells: Sequence[Cell], reference_top1: float, choice: Choice) -> str:
    """:func:`~kd_lib.eval.sweep.table_rows` as an HTML ``<table>``; text is escaped."""
    headers, numeric, rows = table_rows(cells, reference_top1, choice)

    attr = {True: ' class="num"', False: ""}

    def row(tag: str, texts: list[str]) -> str:
        return "<tr>" + "".join(f"<{tag}{attr[n]}>{html.escape(t)}</{tag}>" for t, n in zip(texts, numeric)) + "</tr>"

    body = "\n".join(row("td", r) for r in rows)
    return f"<table>\n<thead>{row('th', headers)}</thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def sweep_html(summary: Mapping[str, Any], front_png: bytes, inputs_png: bytes) -> str:
    """Self-contained HTML page of a sweep's ``summary`` (:func:`kd_lib.eval.sweep.sweep_summary`, and
    ``dataset`` when it has one): the choice, the table, :func:`front_figure`'s and :func:`inputs_figure`'s
    PNGs inlined."""
    cells = [Cell.from_dict(c) for c in summary["cells"]]
    choice = Choice.from_dict(summary["choice"], cells)
    title = "Resolution and model sweep" + (f": {dataset_name(summary)}" if "dataset" in summary else "")
    return html_page(title, f"""<p><strong>{html.escape(choice.message)}</strong></p>
{_html_table(cells, summary["reference_top1"], choice)}
<p class="note">Top-1 is the mean over a cell's seeds; SE is the standard deviation over seeds / sqrt(seeds), or
with one seed the binomial sqrt(p (1 - p) / n) of the val split. "of ref %": top-1 as a percentage of the
reference's {100 * summary["reference_top1"]:.2f} %. Gain: over the cell's LR baseline (same architecture and size,
no distillation), with two SE of the difference. "within noise": a difference of at most two SE; such cells
are not ranked against each other.</p>
{_img(front_png, "top-1 against input bytes, GFLOPs and latency per cell")}
{_img(inputs_png, "validation images at each input size with each cell's prediction")}""")
