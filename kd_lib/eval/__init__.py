"""Evaluation: top-k accuracy, deployment cost, and the summary's tables, plot and HTML report."""

from kd_lib.eval.accuracy import evaluate_classifier, topk_correct
from kd_lib.eval.cost import (
    count_gflops,
    count_params,
    input_bytes,
    latency_profile,
    measure_latency_ms,
    torch_threads,
)
from kd_lib.eval.report import (
    format_table,
    markdown_table,
    plot_accuracy_vs_gflops,
    render_html,
    write_report,
)

__all__ = [
    "count_gflops",
    "count_params",
    "evaluate_classifier",
    "format_table",
    "input_bytes",
    "latency_profile",
    "markdown_table",
    "measure_latency_ms",
    "plot_accuracy_vs_gflops",
    "render_html",
    "topk_correct",
    "torch_threads",
    "write_report",
]
