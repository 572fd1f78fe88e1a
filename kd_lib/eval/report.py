"""Tables, plot and HTML report from the evaluate stage's summary.

The summary (``summary.json``) has the form::

    {"task": "classification" | "detection",  # optional, "classification" when absent
     "dataset": {"uri", "fingerprint", "num_classes", "train_images", "val_images"},
     "hr_size": int, "ratio": int,
     "models": [{"name", "arch", "input_size", <accuracy keys>, "params", "gflops",
                 "input_bytes", "latency_ms": {"batch_1": ms, "batch_64": ms},
                 "started_from": "random" | weights,                # optional
                 "export": {<the export stage's numbers>}}]}        # optional

The accuracy keys depend on the task, see :data:`TASKS`: ``top1`` and ``top5``
for classification; COCO's ``AP``, ``AP50``, ``AP75``, ``APs``, ``APm`` and
``APl`` for detection, ``None`` where the data has no object of that size. All
are fractions in [0, 1]; tables show them in percent and the plot puts the
task's headline metric (top-1 or AP) against GFLOPs. A model counts as HR when
its input size is at least ``hr_size``, as LR otherwise.

Optional keys, written by the evaluate stage and shown when present:
``device`` and ``code_version`` (where latency was measured, which code
trained the models); per model ``stage``, ``method``, ``distilled_from``,
``settings`` (those that differ from the stage's defaults) and ``history``
(the training loop's rows: ``epoch``, ``train_loss`` and one ``train_<term>``
per loss term, ``val_top1``...), drawn as training curves; ``verdicts``,
``advice`` and ``gate`` from :mod:`kd_lib.eval.verdicts`. A classification
plot has a chance line at ``1 / num_classes`` and error bars of two binomial
standard errors of each top-1 on the val split.
"""

from __future__ import annotations

import base64
import html
import io
import math
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator

from kd_lib.eval.detection import METRICS
from kd_lib.eval.verdicts import standard_error, verdict_lines
from kd_lib.io.fs import join, write_bytes, write_text

Summary = dict[str, Any]
Model = dict[str, Any]

HR_COLOR = "#1f77b4"
LR_COLOR = "#d62728"
MAX_MARKER_AREA = 600.0  # pt^2, given to the model with the most input bytes
LEADER_LINE = {"arrowstyle": "-", "color": "0.55", "lw": 0.6}
REPORT_FILE, PLOT_FILE = "report.html", "report.png"  # what :func:`write_report` writes


@dataclass(frozen=True)
class _Column:
    """One table column: header, whether it is a right-aligned number, and its cell text."""

    header: str
    numeric: bool
    cell: Callable[[Model], str]


def _percent_column(header: str, key: str, decimals: int) -> _Column:
    """Column of the fraction ``model[key]`` in percent; an em dash where it is ``None``."""

    def cell(m: Model) -> str:
        value = m[key]
        return "\u2014" if value is None else f"{100 * value:.{decimals}f}"

    return _Column(header, True, cell)


@dataclass(frozen=True)
class _Task:
    """What a task reports: the model key of its headline metric, the metric's name in text
    and in the plot's title, and the task's accuracy columns."""

    key: str
    name: str
    title: str
    columns: tuple[_Column, ...]


#: Each summary task's headline metric and accuracy columns.
TASKS = {
    "classification": _Task(
        "top1",
        "top-1 accuracy",
        "Top-1",
        (_percent_column("top-1 %", "top1", 2), _percent_column("top-5 %", "top5", 2)),
    ),
    "detection": _Task(
        "AP", "COCO AP", "COCO AP", tuple(_percent_column(key, key, 2) for key in METRICS)
    ),
}


def _task(summary: Summary) -> _Task:
    """The summary's task, ``"classification"`` when it names none."""
    name = summary.get("task", "classification")
    if name not in TASKS:
        raise ValueError(f"unknown summary task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]


def _latency_keys(models: list[Model]) -> list[str]:
    """Latency keys present in any model, by batch size (``batch_1`` before ``batch_64``)."""
    keys = {key for m in models for key in m.get("latency_ms", {})}

    def batch(key: str) -> tuple[float, str]:
        suffix = key.rpartition("_")[2]
        return (int(suffix) if suffix.isdigit() else math.inf, key)

    return sorted(keys, key=batch)


def _latency_column(key: str) -> _Column:
    """Column for one latency key: ``batch_64`` becomes header ``lat b64 ms``."""
    label = "b" + key.rpartition("_")[2] if key.startswith("batch_") else key

    def cell(m: Model) -> str:
        value = m.get("latency_ms", {}).get(key)
        return "-" if value is None else f"{value:.2f}"

    return _Column(f"lat {label} ms", True, cell)


def _export_columns(models: list[Model]) -> list[_Column]:
    """Where each model started from (when the summary says) and, when any model was exported
    (``export``: the export stage's numbers), its ONNX size, top-1 agreement of onnxruntime with
    PyTorch, int8 size and int8 agreement; a dash for a model without them."""
    columns = [_Column("started from", False, lambda m: str(m.get("started_from", "random")))
               ] if any("started_from" in m for m in models) else []
    if not any("export" in m for m in models):
        return columns

    def cell(key: str, text: Callable[[float], str]) -> Callable[[Model], str]:
        return lambda m: text(m["export"][key]) if key in m.get("export", {}) else "-"

    return columns + [
        _Column("onnx MB", True, cell("onnx_bytes", lambda v: f"{v / 1e6:.2f}")),
        _Column("onnx agree %", True, cell("agreement", lambda v: f"{100 * v:.1f}")),
        _Column("int8 MB", True, cell("int8_bytes", lambda v: f"{v / 1e6:.2f}")),
        _Column("int8 agree %", True, cell("int8_agreement", lambda v: f"{100 * v:.1f}")),
    ]


def _columns(summary: Summary) -> list[_Column]:
    """The report's columns, with the task's accuracy columns; numbers are formatted once
    here for every output format."""
    models = summary["models"]
    return [
        _Column("name", False, lambda m: str(m["name"])),
        _Column("arch", False, lambda m: str(m["arch"])),
        _Column("input px", True, lambda m: str(m["input_size"])),
        *_task(summary).columns,
        _Column("params M", True, lambda m: f"{m['params'] / 1e6:.2f}"),
        _Column("GFLOPs", True, lambda m: f"{m['gflops']:.3f}"),
        _Column("input bytes", True, lambda m: f"{m['input_bytes']:,}"),
        *(_latency_column(key) for key in _latency_keys(models)),
        *_export_columns(models),
    ]


def table_rows(summary: Summary) -> tuple[list[str], list[bool], list[list[str]]]:
    """``(headers, numeric, rows)``: column headers, which columns are right-aligned numbers,
    and one row of formatted cells per model, in summary order."""
    columns = _columns(summary)
    rows = [[c.cell(m) for c in columns] for m in summary["models"]]
    return [c.header for c in columns], [c.numeric for c in columns], rows


def format_table(summary: Summary) -> str:
    """Plain-text table for the terminal: padded columns, numbers right-aligned."""
    headers, numeric, rows = table_rows(summary)
    widths = [max(len(cell) for cell in col) for col in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        padded = (
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)
        )
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def markdown_table(summary: Summary) -> str:
    """GitHub Markdown table: numeric columns right-aligned, ``|`` in cells escaped."""
    headers, numeric, rows = table_rows(summary)

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = "|" + "|".join("---:" if num else "---" for num in numeric) + "|"
    return "\n".join([line(headers), align, *(line(r) for r in rows)])


def _html_table(summary: Summary) -> str:
    """HTML ``<table>`` with one ``<tr>`` per model in ``<tbody>``; text is escaped."""
    headers, numeric, rows = table_rows(summary)

    def cells(tag: str, values: list[str]) -> str:
        attr = {True: ' class="num"', False: ""}
        return "".join(
            f"<{tag}{attr[num]}>{html.escape(v)}</{tag}>" for v, num in zip(values, numeric)
        )

    head = f"<thead><tr>{cells('th', headers)}</tr></thead>"
    body = "\n".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    return f"<table>\n{head}\n<tbody>\n{body}\n</tbody>\n</table>"


def dataset_name(summary: Summary) -> str:
    """Last path component of the dataset URI (the whole URI if it has none)."""
    uri = str(summary["dataset"]["uri"])
    return posixpath.basename(uri.rstrip("/")) or uri


def _is_hr(model: Model, summary: Summary) -> bool:
    """A model is HR when its input size is at least ``hr_size``."""
    return model["input_size"] >= summary["hr_size"]


Box = tuple[float, float, float, float]  # x0, x1, y_center, half height, in display pixels


def _push(box: Box, obstacles: list[Box], step: int) -> float:
    """Nearest centre from ``box``'s own, upwards (``step`` 1) or downwards (``step`` -1), at which it
    overlaps none of ``obstacles``."""
    x0, x1, y, half = box
    moved = True
    while moved:
        moved = False
        for a0, a1, ay, ah in obstacles:
            clear = ay + step * (half + ah)
            # ``(clear - y) * step > 0``, not only the overlap test: ``clear - ay`` may round to just under
            # ``half + ah``, and the label would be "moved" to where it already is, forever.
            if x0 < a1 and a0 < x1 and abs(y - ay) < half + ah and (clear - y) * step > 0:
                y = clear
                moved = True
    return y


def _place_labels(ax: Axes, fig: Figure, points: list[tuple[float, float, str, float]]) -> None:
    """Label each ``(x, y, text, marker_area)`` point to its right, moved up or down, whichever is
    nearer and keeps it inside the axes (so off the title), until it overlaps no other marker, no
    earlier label and not the legend; a displaced label gets a leader line."""
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72
    legend = ax.get_legend().get_window_extent(renderer)
    legend_box = (legend.x0, legend.x1, (legend.y0 + legend.y1) / 2, legend.height / 2)
    centres = [ax.transData.transform((x, y)) for x, y, _, _ in points]
    radii = [math.sqrt(area) / 2 * px_per_pt for *_, area in points]
    markers = [(px - r, px + r, py, r) for (px, py), r in zip(centres, radii)]
    labels: list[Box] = []
    for i in sorted(range(len(points)), key=lambda j: points[j][1]):
        x, y, text, _ = points[i]
        (px, py), r = centres[i], radii[i]
        probe = ax.text(0, 0, text, fontsize=9)
        bbox = probe.get_window_extent(renderer)
        probe.remove()
        x0 = px + r + 4 * px_per_pt
        half = bbox.height / 2 + 1
        others = [m for j, m in enumerate(markers) if j != i]
        moves = [_push((x0, x0 + bbox.width, py, half), [*others, *labels, legend_box], step) for step in (1, -1)]
        inside = [y for y in moves if ax.bbox.y0 + half <= y <= ax.bbox.y1 - half] or moves
        label_y = min(inside, key=lambda y: abs(y - py))
        labels.append((x0, x0 + bbox.width, label_y, half))
        ax.annotate(
            text,
            xy=(x, y),
            xytext=((x0 - px) / px_per_pt, (label_y - py) / px_per_pt),
            textcoords="offset points",
            fontsize=9,
            va="center",
            ha="left",
            arrowprops=LEADER_LINE if abs(label_y - py) > half else None,
        )


def _set_limits(ax: Axes, gflops: list[float], scores: list[float]) -> None:
    """Log x axis when ``max / min > 10`` GFLOPs; margins leave room for labels on the right."""
    lo, hi = min(gflops), max(gflops)
    if lo > 0 and hi / lo > 10:
        ax.set_xscale("log")
        ax.set_xlim(lo / 1.6, hi * 4)
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    else:
        span = (hi - lo) or max(hi, 1e-3)
        ax.set_xlim(max(lo - 0.15 * span, 0), hi + 0.6 * span)
    y_lo, y_hi = min(scores), max(scores)
    y_span = max(y_hi - y_lo, 2.0)
    ax.set_ylim(max(y_lo - 0.2 * y_span, 0), min(y_hi + 0.35 * y_span, 100))


def _size_groups(models: list[Model], summary: Summary, hr: bool) -> str:
    """Input sizes of the HR (or LR) models for the legend, largest first: ``"112 px, 56 px"``."""
    sizes = sorted({m["input_size"] for m in models if _is_hr(m, summary) == hr}, reverse=True)
    return ", ".join(f"{s} px" for s in sizes)


def _chance(summary: Summary) -> float | None:
    """Top-1 of a uniform guess, in %, for a classification summary; None for detection."""
    if _task(summary) is not TASKS["classification"]:
        return None
    return 100 / summary["dataset"]["num_classes"]


def training_curves_figure(summary: Summary) -> Figure | None:
    """One panel per model with a training ``history``: the training loss and each of its terms
    per epoch (left axis, log scale), the validation top-1 in % (right axis) with the chance line.
    None when no model has a history."""
    models = [m for m in summary["models"] if m.get("history")]
    if not models:
        return None
    cols = min(len(models), 3)
    rows = math.ceil(len(models) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    chance = _chance(summary)
    for i, model in enumerate(models):
        ax = fig.add_subplot(rows, cols, i + 1)
        history = model["history"]
        epochs = [row["epoch"] for row in history]
        losses = [k for k in history[0] if k.startswith("train_")]
        for key in losses:
            values = [row.get(key) for row in history]
            ax.plot(epochs, values, marker=".", lw=1.6 if key == "train_loss" else 1.0,
                    label=key.removeprefix("train_"))
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss")
        ax.set_title(f"{model['name']} ({model.get('method', '?')}, {model['input_size']} px)", fontsize=10)
        ax.legend(fontsize=7, loc="upper right")
        if "val_top1" in history[0]:
            acc = ax.twinx()
            acc.plot(epochs, [100 * row["val_top1"] for row in history], color="black", marker="o", lw=1.4)
            if chance is not None:
                acc.axhline(chance, color="0.5", ls="--", lw=0.8)
            acc.set_ylim(0, 100)
            acc.set_ylabel("val top-1 % (black; dashed: chance)")
    return fig


def accuracy_vs_gflops_figure(summary: Summary) -> Figure:
    """Figure of the task's headline metric (top-1 or AP, in %) against GFLOPs, one
    marker per model.

    Marker area is proportional to input bytes (the largest gets
    ``MAX_MARKER_AREA`` pt^2); HR and LR models get two colours.
    """
    task = _task(summary)
    models = summary["models"]
    if not models:
        raise ValueError("summary has no models to plot")
    fig = Figure(figsize=(8.5, 5.5), dpi=120, layout="constrained")
    fig.get_layout_engine().set(rect=(0, 0.04, 1, 0.96))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    max_bytes = max(m["input_bytes"] for m in models)
    gflops = [m["gflops"] for m in models]
    scores = [100 * m[task.key] for m in models]
    areas = [MAX_MARKER_AREA * m["input_bytes"] / max_bytes for m in models]
    chance = _chance(summary)
    _set_limits(ax, gflops, scores if chance is None else [*scores, chance])
    if chance is not None:
        n = summary["dataset"]["val_images"]
        ax.errorbar(gflops, scores, yerr=[200 * standard_error(m["top1"], n) for m in models],
                    fmt="none", ecolor="0.3", elinewidth=0.8, capsize=3, zorder=2)
        ax.axhline(chance, color="0.5", ls="--", lw=0.8, label=f"chance ({chance:.1f} %)", zorder=1)
    for hr, color, label in ((True, HR_COLOR, "HR input"), (False, LR_COLOR, "LR input")):
        idx = [i for i, m in enumerate(models) if _is_hr(m, summary) == hr]
        if idx:
            ax.scatter(
                [gflops[i] for i in idx],
                [scores[i] for i in idx],
                s=[areas[i] for i in idx],
                c=color,
                alpha=0.75,
                edgecolors="black",
                linewidths=0.6,
                label=f"{label} ({_size_groups(models, summary, hr)})",
                zorder=3,
            )
    ax.set_xlabel("forward GFLOPs per image (at the model's input size)")
    ax.set_ylabel(f"{task.name} (%)")
    ax.set_title(
        f"{task.title} vs compute: {dataset_name(summary)}, "
        f"HR {summary['hr_size']} px, ratio {summary['ratio']}"
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right", markerscale=0.5, fontsize=9)
    fig.text(
        0.01,
        0.01,
        f"Marker area \u221d input bytes per image (3 \u00d7 px\u00b2, 8-bit); "
        f"largest = {max_bytes:,} B."
        + (" Bars: \u00b12 binomial standard errors on the val split." if chance is not None else ""),
        fontsize=8,
        color="0.35",
        ha="left",
        va="bottom",
    )
    fig.draw_without_rendering()
    fig.set_layout_engine("none")
    labels = [f"{m['name']} ({m['input_size']} px)" for m in models]
    _place_labels(ax, fig, list(zip(gflops, scores, labels, areas)))
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_accuracy_vs_gflops(summary: Summary) -> bytes:
    """PNG of :func:`accuracy_vs_gflops_figure`."""
    return _png(accuracy_vs_gflops_figure(summary))


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin-top: 1em; }
th, td { padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: left; }
th { background: #f4f4f4; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; }
.note { color: #666; font-size: 0.9em; }
.verdicts li { margin: 0.2em 0; }
"""


def _dataset_line(summary: Summary) -> str:
    """One escaped HTML sentence on the dataset, HR size and ratio."""
    ds = summary["dataset"]
    return (
        f"Dataset <code>{html.escape(str(ds['uri']))}</code> "
        f"(fingerprint <code>{html.escape(str(ds['fingerprint'])[:12])}</code>): "
        f"{ds['num_classes']:,} classes, {ds['train_images']:,} train / "
        f"{ds['val_images']:,} val images. "
        f"HR {summary['hr_size']} px, ratio {html.escape(str(summary['ratio']))}."
    )


def _run_line(summary: Summary) -> str:
    """Where latency was measured and which code trained the models, when the summary says."""
    parts = []
    if summary.get("device"):
        parts.append(f"Latency measured on <code>{html.escape(str(summary['device']))}</code>.")
    if summary.get("code_version"):
        parts.append(f"Code version <code>{html.escape(str(summary['code_version'])[:12])}</code>.")
    return f"<p>{' '.join(parts)}</p>" if parts else ""


def _verdicts_html(summary: Summary) -> str:
    """The gate's message, each verdict and the advice (:func:`kd_lib.eval.verdicts.verdict_lines`)."""
    lines = verdict_lines(summary)
    if not lines:
        return ""
    items = "\n".join(f"<li>{html.escape(line)}</li>" for line in lines)
    return (f'<h2>Verdicts</h2>\n<ul class="verdicts">\n{items}\n</ul>\n<p class="note">"within noise": the '
            f"difference is under two binomial standard errors of the {summary['dataset']['val_images']:,} "
            f"val images.</p>")


def _training_html(summary: Summary) -> str:
    """Table of how each model was trained (stage, method, teacher, settings that differ from the
    stage's defaults) and the training curves, for the models that say."""
    models = [m for m in summary["models"] if "method" in m]
    if not models:
        return ""

    def settings(m: Model) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(m.get("settings", {}).items())) or "defaults"

    rows = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            m["name"], m.get("stage", ""), m["method"], m.get("distilled_from") or "\u2014", settings(m)))
        + "</tr>" for m in models)
    head = "".join(f"<th>{h}</th>" for h in ("name", "stage", "method", "distilled from",
                                              "settings that differ from the defaults"))
    table = f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>"
    curves = training_curves_figure(summary)
    img = "" if curves is None else (
        f'<img alt="training curves per model" '
        f'src="data:image/png;base64,{base64.b64encode(_png(curves)).decode("ascii")}">')
    return f"<h2>Training</h2>\n{table}\n{img}"


def html_page(title: str, body: str) -> str:
    """A self-contained HTML page of the reports' style: ``title`` as its title and heading, then ``body``."""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
{body}
</body>
</html>
"""


def render_html(summary: Summary, plot: bytes | None = None) -> str:
    """Self-contained HTML report: dataset and run lines, embedded PNG plot (``plot``, the PNG of
    :func:`plot_accuracy_vs_gflops`, rendered here when not given), model table, verdicts, and how
    each model was trained with its curves."""
    png = base64.b64encode(plot or plot_accuracy_vs_gflops(summary)).decode("ascii")
    title = f"Low-resolution distillation report: {dataset_name(summary)}"
    alt = f"{_task(summary).name} against GFLOPs per model"
    return html_page(title, f"""<p>{_dataset_line(summary)}</p>
{_run_line(summary)}
<img alt="{html.escape(alt)}" src="data:image/png;base64,{png}">
{_html_table(summary)}
<p class="note">Accuracy on the validation set at each model's own input size; cost
(GFLOPs, input bytes, latency) for one forward at that size.</p>
{_verdicts_html(summary)}
{_training_html(summary)}""")


def write_report(summary: Summary, out_dir: str) -> str:
    """Write ``out_dir/report.html`` (see :func:`render_html`) and its plot alone,
    ``out_dir/report.png``, each atomically; return the report's URI."""
    plot = plot_accuracy_vs_gflops(summary)
    write_bytes(join(out_dir, PLOT_FILE), plot)
    uri = join(out_dir, REPORT_FILE)
    write_text(uri, render_html(summary, plot))
    return uri
