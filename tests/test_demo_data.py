import io

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from kd_lib.data.demo import DemoClass, generate_demo_dataset, image_rng, render_image
from kd_lib.ops import downsample

SMALL = {"num_classes": 4, "train_per_class": 3, "val_per_class": 2, "size": 32}


def files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))


def test_layout_counts_and_real_pngs(tmp_path):
    info = generate_demo_dataset(str(tmp_path), **SMALL)
    assert info["classes"] == ["00_red_plain", "01_red_striped", "02_yellow_plain", "03_yellow_striped"]
    names = files(tmp_path)
    assert len(names) == 4 * 3 + 4 * 2
    assert "train/01_red_striped/00002.png" in names and "val/03_yellow_striped/00001.png" in names
    image = Image.open(tmp_path / names[0])
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (32, 32)
    assert (tmp_path / "demo.json").exists()


def test_deterministic_from_the_seed(tmp_path):
    generate_demo_dataset(str(tmp_path / "a"), seed=3, **SMALL)
    generate_demo_dataset(str(tmp_path / "b"), seed=3, **SMALL)
    generate_demo_dataset(str(tmp_path / "c"), seed=4, **SMALL)
    name = "train/02_yellow_plain/00001.png"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    train = (tmp_path / "a" / "train/00_red_plain/00000.png").read_bytes()
    assert train != (tmp_path / "a" / "val/00_red_plain/00000.png").read_bytes()


def test_rerun_is_a_no_op_and_other_parameters_are_refused(tmp_path):
    generate_demo_dataset(str(tmp_path), **SMALL)
    path = tmp_path / "train/00_red_plain/00000.png"
    stamp = path.stat().st_mtime_ns
    generate_demo_dataset(str(tmp_path), **SMALL)
    assert path.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match=r"other parameters: size=32 \(asked 48\)"):
        generate_demo_dataset(str(tmp_path), **{**SMALL, "size": 48})


def test_works_on_memory_filesystem():
    fs = fsspec.filesystem("memory")
    try:
        generate_demo_dataset("memory://demo", **SMALL)
        data = fs.cat_file("/demo/val/00_red_plain/00000.png")
        assert Image.open(io.BytesIO(data)).size == (32, 32)
    finally:
        fs.rm("/demo", recursive=True)


def test_stripes_differ_at_hr_and_are_degraded_not_gone_at_lr():
    """Two classes that share a colour differ only in stripes near the limit of what a 4x
    antialiased downsampling keeps: the same draw rendered with either surface gives images far
    apart at 64 px and closer at 16 px, but not alike (the cue is degraded, not removed: what an
    LR model can still learn from, poorly), while a downsampling that aliases (nearest) keeps the
    whole difference."""
    antialiased, aliased = [], []
    for index in range(8):
        pair = [render_image(image_rng(0, "train", 0, index), DemoClass("x", "green", surface), 64)
                for surface in ("plain", "striped")]
        hr = torch.tensor(np.stack(pair), dtype=torch.float32).permute(0, 3, 1, 2) / 255
        gap = lambda images: (images[0] - images[1]).pow(2).mean().sqrt().item()  # noqa: E731
        assert gap(hr) > 0.02, "the surfaces should differ visibly at HR"
        antialiased.append(gap(downsample(hr, 4, "bilinear")) / gap(hr))
        aliased.append(gap(downsample(hr, 4, "nearest")) / gap(hr))
    assert 0.15 < np.mean(antialiased) < 0.6 and max(antialiased) < 0.6, antialiased
    assert np.mean(aliased) > 0.6, aliased
