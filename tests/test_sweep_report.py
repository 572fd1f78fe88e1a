"""The sweep's figures and HTML page over hand-made cells: valid PNGs, the camera's view, both images inlined."""

import base64
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kd_lib.eval.sweep import Budget, Cell, choose, sweep_summary
from kd_lib.eval.sweep_report import camera_view, front_figure, inputs_figure, sweep_html


def cells():
    made = []
    for arch, gflops, latency in (("resnet18", 0.3, 6.0), ("mobilenet_v3_small", 0.02, 2.0)):
        for ratio, top1, baseline in ((1, 0.95, ()), (2, 0.92, (0.85,)), (4, 0.84, (0.55, 0.57)), (8, 0.6, (0.4,))):
            side = 64 // ratio
            made.append(Cell(arch, ratio, side, (top1 - (arch != "resnet18") * 0.03,), baseline, 600, 3 * side**2,
                             gflops / ratio**2, latency / ratio))
    return made


def open_png(data: bytes, path) -> Image.Image:
    assert path.read_bytes() == data
    image = Image.open(io.BytesIO(data))
    image.verify()
    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize("budget", [Budget(keep=0.9), Budget(keep=0.99, max_bytes=768), Budget(max_gflops=0.01)])
def test_the_front_figure_is_a_png_of_three_panels(tmp_path, budget):
    choice = choose(cells(), 0.95, 0.009, budget)
    png = front_figure(cells(), choice, str(tmp_path / "front.png"))
    image = open_png(png, tmp_path / "front.png")
    assert image.format == "PNG" and image.width > 2 * image.height  # three panels side by side


def stripes(period: int) -> torch.Tensor:
    """A 64 px uint8 (H, W, 3) image of vertical stripes ``period`` px wide, white on black."""
    x = torch.arange(64)
    row = ((x // period) % 2 * 255).to(torch.uint8)
    return row.view(1, 64, 1).expand(64, 64, 3).contiguous()


def test_the_camera_view_is_the_antialiased_downsample_shown_in_blocks():
    view = camera_view(stripes(1), 16)
    assert view.shape == (64, 64, 3) and view.dtype == np.uint8
    # antialiased: one-pixel stripes blur to grey at a quarter of the side (nearest would keep 0 or 255)
    assert np.all(np.abs(view.astype(int) - 128) < 20)
    lr = F.interpolate(stripes(4).permute(2, 0, 1)[None].float() / 255, size=(16, 16), mode="bilinear",
                       antialias=True, align_corners=False)
    expected = (lr[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    blocks = camera_view(stripes(4), 16)
    assert np.array_equal(blocks[::4, ::4], expected)
    assert np.array_equal(blocks, np.kron(expected, np.ones((4, 4, 1), dtype=np.uint8)))  # each input pixel a block
    with pytest.raises(ValueError, match="does not divide"):
        camera_view(stripes(4), 24)


def test_the_inputs_figure_is_a_png_from_pil_images_or_tensors(tmp_path):
    images = [stripes(1), Image.fromarray(stripes(4).numpy())]
    predictions = {c.key: [0, 1 if c.ratio < 8 else 0] for c in cells()}
    png = inputs_figure(images, [64, 32, 16, 8], predictions, ["fine", "coarse"], [0, 1], str(tmp_path / "in.png"))
    image = open_png(png, tmp_path / "in.png")
    assert image.format == "PNG" and image.height > image.width / 4 * 2 * 0.9  # two rows of four square tiles
    with pytest.raises(ValueError, match="square uint8"):
        inputs_figure([torch.zeros(64, 32, 3, dtype=torch.uint8)], [16], {}, ["a"], [0], str(tmp_path / "x.png"))


def test_the_html_page_inlines_both_figures_and_shows_the_choice(tmp_path):
    made = cells()
    budget = Budget(keep=0.9)
    choice = choose(made, 0.95, 0.009, budget)
    summary = json.loads(json.dumps({**sweep_summary(made, 0.95, 0.009, budget, choice),
                                     "dataset": {"uri": "gs://bucket/flowers/"}}))
    front = front_figure(made, choice, str(tmp_path / "front.png"))
    inputs = inputs_figure([stripes(2)], [64, 16], {"resnet18@4": [0]}, ["a"], [0], str(tmp_path / "in.png"))
    page = sweep_html(summary, front, inputs)
    assert page.startswith("<!DOCTYPE html>") and "<title>Resolution and model sweep: flowers</title>" in page
    for png in (front, inputs):
        assert f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}"' in page
    assert choice.message.replace("'", "&#x27;") in page
    assert page.count("<tr>") == 1 + len(made) and "<td>chosen</td>" in page
