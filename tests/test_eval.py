import base64
import io
import math
import re

import pytest
import torch
import torchvision
from PIL import Image

from kd_lib.data.transforms import PairedResize
from kd_lib.eval.accuracy import evaluate_classifier, topk_correct
from kd_lib.eval.cost import count_gflops, count_params, input_bytes, latency_profile
from kd_lib.eval.report import format_table, markdown_table, plot_accuracy_vs_gflops, render_html, write_report
from kd_lib.io.fs import read_text


def test_topk_counts_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0],   # label 1: top-1
                           [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],   # label 4: rank 5 -> top-5 only
                           [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],   # label 5: rank 6 -> neither
                           [0.2, 0.2, 0.0, 0.0, 0.0, 0.0]])  # label 0 tied with 1: counts against
    labels = torch.tensor([1, 4, 5, 0])
    assert topk_correct(logits, labels) == {1: 1, 5: 3}


def test_topk_is_capped_by_the_class_count():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    assert topk_correct(logits, torch.tensor([2, 0]), ks=(1, 5)) == {1: 0, 5: 2}


def test_topk_never_counts_a_nan_label_logit_and_checks_shapes():
    logits = torch.tensor([[float("nan"), 1.0], [2.0, float("nan")]])
    assert topk_correct(logits, torch.tensor([0, 0]), ks=(1, 2)) == {1: 1, 2: 1}
    with pytest.raises(ValueError, match="labels"):
        topk_correct(logits, torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="k"):
        topk_correct(logits, torch.tensor([0, 1]), ks=(0,))


class Pick(torch.nn.Module):
    """Logits = the mean of each of the first channels: the label is the channel with the largest mean."""

    def forward(self, x):
        return x.mean((2, 3))


def test_evaluate_uses_the_requested_view():
    pairing = PairedResize(4, "nearest")  # LR pixel (i, j) is HR pixel (4 i, 4 j)
    images = torch.zeros(4, 8, 8, 3, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0])
    for i, y in enumerate(labels):
        images[i, :, :, y] = 255
        images[i, ::4, ::4] = 0
        images[i, ::4, ::4, (y + 1) % 3] = 255  # the 4 pixels the LR view keeps point at the wrong class
    hr, lr = pairing(images)
    assert hr.shape == (4, 3, 8, 8) and lr.shape == (4, 3, 2, 2)
    loader = [(images[:2], labels[:2]), (images[2:], labels[2:])]
    assert evaluate_classifier(Pick(), loader, pairing, "hr", "cpu") == {"top1": 1.0, "top5": 1.0, "count": 4}
    assert evaluate_classifier(Pick(), loader, pairing, "lr", "cpu")["top1"] == 0.0
    with pytest.raises(ValueError, match="view"):
        evaluate_classifier(Pick(), loader, pairing, "mr", "cpu")


def test_evaluate_restores_the_training_flag_and_rejects_an_empty_loader():
    model = Pick().train()
    batch = (torch.randint(0, 256, (2, 4, 4, 3), dtype=torch.uint8), torch.tensor([0, 1]))
    evaluate_classifier(model, [batch], PairedResize(2), "lr", "cpu")
    assert model.training
    with pytest.raises(ValueError, match="no samples"):
        evaluate_classifier(model, [], PairedResize(2), "hr", "cpu")


def test_flops_match_the_hand_formula():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    assert count_gflops(conv, 16) * 1e9 == 2 * 3 * 8 * 3 * 3 * 16 * 16
    assert count_gflops(torchvision.models.resnet18(), 224) == pytest.approx(3.63, abs=0.02)
    assert count_params(conv) == 8 * 3 * 9 + 8
    assert input_bytes(16) == 768 and input_bytes(64) == 12288 and input_bytes(8, channels=1) == 64


def test_flop_count_leaves_batchnorm_and_the_training_flag_alone():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    count_gflops(model, 8)
    assert model.training and model[1].num_batches_tracked.item() == 0


def test_latency_is_a_positive_median():
    profile = latency_profile(torch.nn.Conv2d(3, 4, 3), 16, "cpu", batch_sizes=(1, 4), warmup=1, repeats=3)
    assert set(profile) == {"batch_1", "batch_4"}
    assert all(0 < v < 1000 and math.isfinite(v) for v in profile.values())


def summary():
    model = {"arch": "resnet18", "params": 11_181_642, "latency_ms": {"batch_1": 3.21, "batch_64": 40.5}}
    return {"dataset": {"uri": "/data/tiny", "fingerprint": "ab" * 32, "num_classes": 10,
                        "train_images": 5000, "val_images": 500},
            "hr_size": 64, "ratio": 4,
            "models": [{**model, "name": "teacher", "arch": "resnet34", "input_size": 64, "top1": 0.6512,
                        "top5": 0.95, "gflops": 0.2378, "input_bytes": 12288},
                       {**model, "name": "student", "input_size": 16, "top1": 0.4, "top5": 0.81,
                        "gflops": 0.0238, "input_bytes": 768}]}


def test_tables_hold_every_model_with_formatted_numbers():
    text, markdown = format_table(summary()), markdown_table(summary())
    for table in (text, markdown):
        assert "teacher" in table and "student" in table and "65.12" in table and "12,288" in table
    assert markdown.splitlines()[1].startswith("|") and set(markdown.splitlines()[1]) <= set("|-: ")


def test_table_rows_are_formatted_cell_by_cell():
    text_rows = format_table(summary()).splitlines()
    markdown_rows = markdown_table(summary()).splitlines()
    assert len(text_rows) == len(markdown_rows) == 4  # header, rule, 2 models
    student = ["student", "resnet18", "16", "40.00", "81.00", "11.18", "0.024", "768", "3.21", "40.50"]
    assert text_rows[3].split() == student
    assert markdown_rows[3] == "| " + " | ".join(student) + " |"
    assert "lat b1 ms" in text_rows[0] and text_rows[0].index("lat b1 ms") < text_rows[0].index("lat b64 ms")


def test_any_model_names_and_latency_batches_fit_the_table():
    s = summary()
    s["models"][1]["name"] = "a|b"
    s["models"][0]["latency_ms"] = {"batch_64": 9.0, "batch_8": 1.5}
    s["models"][1]["latency_ms"] = {"batch_8": 0.25}
    header, _, *rows = markdown_table(s).splitlines()
    assert header.endswith("| lat b8 ms | lat b64 ms |")
    assert rows[0].endswith("| 1.50 | 9.00 |") and rows[1].endswith("| 0.25 | - |")
    assert rows[1].startswith("| a\\|b |")


def test_report_is_self_contained_html_with_a_readable_plot(tmp_path):
    uri = write_report(summary(), str(tmp_path))
    html = (tmp_path / "report.html").read_text()
    assert uri.endswith("report.html")
    assert len(re.findall(r"<tr>", html)) == 3  # header + 2 models
    encoded = re.search(r'src="data:image/png;base64,([^"]+)"', html).group(1)
    image = Image.open(io.BytesIO(base64.b64decode(encoded)))
    assert image.format == "PNG" and image.width > 400
    assert (tmp_path / "report.png").read_bytes() == base64.b64decode(encoded)  # the plot alone, for the README
    assert Image.open(io.BytesIO(plot_accuracy_vs_gflops(summary()))).format == "PNG"


def test_report_escapes_text_and_writes_through_fsspec():
    s = summary()
    s["models"][0]["name"] = "<teacher & co>"
    uri = write_report(s, "memory://eval-report/run1")
    html = read_text(uri)
    assert uri == "memory://eval-report/run1/report.html"
    assert "&lt;teacher &amp; co&gt;" in html and "<teacher" not in html
    assert "/data/tiny" in html and "5,000 train / 500 val images" in html


def five_models():
    """Teacher and assistant at HR, three LR students sharing one architecture and size."""
    s = summary()
    base = s["models"][1]
    s["models"] += [{**base, "name": name, "top1": top1}
                    for name, top1 in (("lr_baseline", 0.35), ("student_onestage", 0.39))]
    s["models"].insert(1, {**s["models"][0], "name": "assistant", "arch": "resnet18", "top1": 0.62,
                           "gflops": 0.1451})
    return s


@pytest.mark.parametrize("models", [five_models()["models"], summary()["models"][:1]],
                         ids=["five-models", "one-model"])
def test_plot_renders_any_number_of_models(models):
    image = Image.open(io.BytesIO(plot_accuracy_vs_gflops({**summary(), "models": models})))
    assert image.format == "PNG"
    with pytest.raises(ValueError, match="no models"):
        plot_accuracy_vs_gflops({**summary(), "models": []})


def test_labels_stay_inside_the_axes_off_the_title():
    """The demo's layout: the assistant's label, moved off the teacher's marker next to it near the
    top, went above the axes onto the title."""
    from kd_lib.eval.report import accuracy_vs_gflops_figure

    s = five_models()
    for m, (top1, gflops) in zip(s["models"], ((0.9375, 0.598), (0.896, 0.296), (0.442, 0.0311), (0.4875, 0.0311),
                                                (0.458, 0.0311))):
        m.update(top1=top1, gflops=gflops)
    fig = accuracy_vs_gflops_figure(s)
    ax, renderer = fig.axes[0], fig.canvas.get_renderer()
    title = ax.title.get_window_extent(renderer)
    assert len(ax.texts) == 5
    for label in ax.texts:
        box = label.get_window_extent(renderer)
        assert ax.bbox.y0 <= box.y0 and box.y1 <= ax.bbox.y1 and not box.overlaps(title), label.get_text()


def trained_summary():
    """:func:`summary` as the evaluate stage writes it now: how each model was trained, verdicts."""
    from kd_lib.eval.verdicts import with_verdicts

    def history(terms):
        return [{"epoch": e, "lr": 0.01, "train_loss": 2 / e, **{f"train_{t}": 1 / e for t in terms},
                 "val_top1": 0.1 * e} for e in (1, 2, 3)]

    s = summary()
    s["models"].append({**s["models"][1], "name": "lr_baseline", "top1": 0.3})
    for m, (stage, method, source, terms) in zip(s["models"], (("teacher", "ce", None, ["ce"]),
                                                                ("student", "kd+isrd", "teacher", ["ce", "kd", "isrd"]),
                                                                ("lr-baseline", "ce", None, ["ce"]))):
        m.update(stage=stage, method=method, distilled_from=source, history=history(terms),
                 settings={"epochs": 3, "isrd_weight": 20.0} if stage == "student" else {})
    return with_verdicts({**s, "device": "cuda:0 (NVIDIA <H200>)", "code_version": "0123456789abcdef"})


def test_report_explains_the_run():
    s = trained_summary()
    html = render_html(s)
    for verdict in s["verdicts"]:
        assert f"<li>{verdict['text']}</li>" in html
    assert "teacher vs lr_baseline: 65.12 % vs 30.00 %, +35.12 points: better" in html
    assert "Latency measured on <code>cuda:0 (NVIDIA &lt;H200&gt;)</code>" in html
    assert "Code version <code>0123456789ab</code>" in html
    assert "<td>student</td><td>student</td><td>kd+isrd</td><td>teacher</td><td>epochs=3, isrd_weight=20.0</td>" in html
    assert "<td>teacher</td><td>teacher</td><td>ce</td><td>\u2014</td><td>defaults</td>" in html
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', html)
    assert images == ["top-1 accuracy against GFLOPs per model", "training curves per model"]


def test_training_curves_draw_each_loss_term_and_the_chance_line():
    from kd_lib.eval.report import accuracy_vs_gflops_figure, training_curves_figure

    fig = training_curves_figure(trained_summary())
    panels = [ax for ax in fig.axes if ax.get_ylabel() == "training loss"]
    assert [ax.get_title() for ax in panels] == ["teacher (ce, 64 px)", "student (kd+isrd, 16 px)",
                                                 "lr_baseline (ce, 16 px)"]
    assert [line.get_label() for line in panels[1].get_lines()] == ["loss", "ce", "kd", "isrd"]
    accuracy = [ax for ax in fig.axes if ax.get_ylabel().startswith("val top-1")][0]
    assert [list(line.get_ydata()) for line in accuracy.get_lines()] == [
        pytest.approx([10, 20, 30]), [10, 10]]  # val top-1 in %, and chance: 1 of 10 classes
    assert training_curves_figure(summary()) is None  # no history, no curves
    ax = accuracy_vs_gflops_figure(trained_summary()).axes[0]
    assert "chance (10.0 %)" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_the_table_says_where_models_started_and_what_their_export_gives():
    data = summary()
    data["models"][0]["started_from"] = "torchvision:DEFAULT"
    data["models"][-1]["export"] = {"onnx_bytes": 44_700_000, "agreement": 1.0, "int8_bytes": 11_300_000,
                                    "int8_agreement": 0.975}
    header, _, *rows = format_table(data).splitlines()
    for column in ("started from", "onnx MB", "onnx agree %", "int8 MB", "int8 agree %"):
        assert column in header
    assert "torchvision:DEFAULT" in rows[0] and rows[0].rstrip().endswith("-")
    assert rows[-1].split()[-4:] == ["44.70", "100.0", "11.30", "97.5"] and " random " in rows[-1]
