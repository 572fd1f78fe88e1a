"""The report for detection summaries (COCO AP columns, AP plot) and classification unchanged."""

import pytest

from kd_lib.eval.report import (
    accuracy_vs_gflops_figure,
    format_table,
    markdown_table,
    plot_accuracy_vs_gflops,
    render_html,
)

DATASET = {"uri": "/data/shapes", "fingerprint": "cd" * 32, "num_classes": 3, "train_images": 800,
           "val_images": 200}
COST = {"arch": "fasterrcnn_resnet18", "params": 28_300_000, "latency_ms": {"batch_1": 12.5}}
AP_HEADERS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def detection_summary():
    """One HR teacher and two LR students; the students' data has no small object."""
    def model(name, size, gflops, ap, aps):
        return {**COST, "name": name, "input_size": size, "gflops": gflops, "input_bytes": 3 * size * size,
                "AP": ap, "AP50": ap + 0.2, "AP75": ap - 0.05, "APs": aps, "APm": ap, "APl": ap + 0.1}
    return {"task": "detection", "dataset": DATASET, "hr_size": 256, "ratio": 4,
            "models": [model("teacher", 256, 40.1, 0.4123, 0.25),
                       model("student", 64, 2.6, 0.3051, None),
                       model("lr_baseline", 64, 2.6, 0.2549, None)]}


def classification_summary():
    """Two classifiers as the evaluate stage writes them: no ``task`` key."""
    cost = {"arch": "resnet18", "params": 11_181_642, "gflops": 0.0238, "input_bytes": 768,
            "latency_ms": {"batch_1": 3.21}}
    return {"dataset": {**DATASET, "uri": "/data/tiny", "num_classes": 10}, "hr_size": 64, "ratio": 4,
            "models": [{**cost, "name": "teacher", "arch": "resnet34", "input_size": 64, "top1": 0.6512,
                        "top5": 0.95, "gflops": 0.2378, "input_bytes": 12288},
                       {**cost, "name": "student", "input_size": 16, "top1": 0.4, "top5": 0.81}]}


def test_detection_tables_show_coco_ap_in_percent_and_a_dash_for_missing_sizes():
    header, _, *rows = format_table(detection_summary()).splitlines()
    assert header.split()[4:10] == AP_HEADERS and "top-1" not in header
    assert rows[0].split()[3:9] == ["41.23", "61.23", "36.23", "25.00", "41.23", "51.23"]
    assert rows[1].split()[3:9] == ["30.51", "50.51", "25.51", "\u2014", "30.51", "40.51"]
    assert rows[2].split()[3:9] == ["25.49", "45.49", "20.49", "\u2014", "25.49", "35.49"]
    assert rows[1].split()[9:] == ["28.30", "2.600", "12,288", "12.50"]
    markdown = markdown_table(detection_summary()).splitlines()
    assert markdown[0].startswith("| name | arch | input px | AP | AP50 | AP75 | APs | APm | APl | params M |")
    assert "| 30.51 | 50.51 | 25.51 | \u2014 | 30.51 | 40.51 |" in markdown[3]


def test_detection_plot_puts_coco_ap_against_gflops():
    ax = accuracy_vs_gflops_figure(detection_summary()).axes[0]
    assert ax.get_ylabel() == "COCO AP (%)" and ax.get_title().startswith("COCO AP vs compute")
    hr, lr = ax.collections
    assert hr.get_offsets().tolist() == [[40.1, pytest.approx(41.23)]]
    assert [y for _, y in lr.get_offsets().tolist()] == pytest.approx([30.51, 25.49])
    assert plot_accuracy_vs_gflops(detection_summary()).startswith(b"\x89PNG")


def test_detection_html_names_the_ap_columns_and_never_top1():
    page = render_html(detection_summary())
    assert all(f'<th class="num">{h}</th>' in page for h in AP_HEADERS)
    assert "top-1" not in page.lower() and 'alt="COCO AP against GFLOPs per model"' in page
    assert "<td class=\"num\">\u2014</td>" in page


def test_classification_without_a_task_renders_as_before():
    summary = classification_summary()
    assert format_table(summary) == "\n".join([
        "name     arch      input px  top-1 %  top-5 %  params M  GFLOPs  input bytes  lat b1 ms",
        "-------  --------  --------  -------  -------  --------  ------  -----------  ---------",
        "teacher  resnet34        64    65.12    95.00     11.18   0.238       12,288       3.21",
        "student  resnet18        16    40.00    81.00     11.18   0.024          768       3.21",
    ])
    assert accuracy_vs_gflops_figure(summary).axes[0].get_ylabel() == "top-1 accuracy (%)"
    assert 'alt="top-1 accuracy against GFLOPs per model"' in render_html(summary)
    explicit = {**summary, "task": "classification"}
    assert markdown_table(explicit) == markdown_table(summary)
    assert plot_accuracy_vs_gflops(explicit) == plot_accuracy_vs_gflops(summary)


def test_an_unknown_task_is_refused():
    with pytest.raises(ValueError, match="segmentation"):
        format_table({**classification_summary(), "task": "segmentation"})


@pytest.mark.parametrize("step", [1, -1], ids=["up", "down"])
def test_a_label_pushed_off_a_marker_stays_there_despite_rounding(step):
    from kd_lib.eval.report import _push

    marker = (0.0, 10.0, 83.40430625000003, 20.412414523193153)  # (ay + half + ah) - ay rounds below half + ah
    box = (5.0, 50.0, 83.40430625000003, 8.6982421875)
    assert _push(box, [marker], step) == 83.40430625000003 + step * (8.6982421875 + 20.412414523193153)
