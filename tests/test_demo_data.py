import io

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from kd_lib.data.demo import SURFACES, DemoClass, generate_demo_dataset, image_rng, render_image
from kd_lib.ops import downsample

SMALL = {"num_classes": 4, "train_per_class": 3, "val_per_class": 2, "size": 32}


def files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))


def test_layout_counts_and_real_pngs(tmp_path):
    info = generate_demo_dataset(str(tmp_path), **SMALL)
    assert info["classes"] == ["00_plain", "01_stripes", "02_checks", "03_rings"]
    names = files(tmp_path)
    assert len(names) == 4 * 3 + 4 * 2
    assert "train/01_stripes/00002.png" in names and "val/03_rings/00001.png" in names
    image = Image.open(tmp_path / names[0])
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (32, 32)
    assert (tmp_path / "demo.json").exists()


def test_deterministic_from_the_seed(tmp_path):
    generate_demo_dataset(str(tmp_path / "a"), seed=3, **SMALL)
    generate_demo_dataset(str(tmp_path / "b"), seed=3, **SMALL)
    generate_demo_dataset(str(tmp_path / "c"), seed=4, **SMALL)
    name = "train/02_checks/00001.png"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    train = (tmp_path / "a" / "train/00_plain/00000.png").read_bytes()
    assert train != (tmp_path / "a" / "val/00_plain/00000.png").read_bytes()


def test_rerun_is_a_no_op_and_other_parameters_are_refused(tmp_path):
    generate_demo_dataset(str(tmp_path), **SMALL)
    path = tmp_path / "train/00_plain/00000.png"
    stamp = path.stat().st_mtime_ns
    generate_demo_dataset(str(tmp_path), **SMALL)
    assert path.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match=r"other parameters: size=32 \(asked 48\)"):
        generate_demo_dataset(str(tmp_path), **{**SMALL, "size": 48})


def test_works_on_memory_filesystem():
    fs = fsspec.filesystem("memory")
    try:
        generate_demo_dataset("memory://demo", **SMALL)
        data = fs.cat_file("/demo/val/00_plain/00000.png")
        assert Image.open(io.BytesIO(data)).size == (32, 32)
    finally:
        fs.rm("/demo", recursive=True)


def test_textures_survive_at_lr_in_a_degraded_form():
    """The same draw rendered plain and with each texture: the images differ
    clearly at 64 px, and after a 4x antialiased downsampling a part of the
    difference survives (the texture period, 7-12 px, is near the 16 px
    image's Nyquist limit of 8 px), while most of it is gone. Nearest
    downsampling, which aliases, keeps about all of it."""
    gap = lambda images: (images[0] - images[1]).pow(2).mean().sqrt().item()  # noqa: E731
    for surface in SURFACES[1:]:
        antialiased, aliased = [], []
        for index in range(6):
            pair = [render_image(image_rng(0, "train", 0, index), DemoClass("x", s), 64)
                    for s in ("plain", surface)]
            hr = torch.tensor(np.stack(pair), dtype=torch.float32).permute(0, 3, 1, 2) / 255
            assert gap(hr) > 0.02, f"{surface} should differ visibly from plain at HR"
            antialiased.append(gap(downsample(hr, 4, "bilinear")) / gap(hr))
            aliased.append(gap(downsample(hr, 4, "nearest")) / gap(hr))
        assert 0.2 < np.mean(antialiased) < 0.7 and np.mean(aliased) > 0.8, (surface, antialiased, aliased)


def test_colour_and_shape_do_not_depend_on_the_class():
    """Only the texture is drawn from the class: with the same generator, two
    classes give the same scene except inside the object."""
    a, b = (render_image(image_rng(0, "train", 0, 5), DemoClass("x", s), 64).astype(int)
            for s in ("stripes", "dots"))
    differ = np.abs(a - b).max(axis=2) > 0
    assert 0.05 < differ.mean() < 0.4


#: A reduced demo: fewer images and epochs, and the HR model is a ResNet-18 that serves as both
#: teacher and assistant (the TAS student starts from it). ``bench/demo_seeds.py`` checks the full demo.
REDUCED = {"seed": 0, "num_classes": 8, "train_per_class": 60, "val_per_class": 25, "size": 64}
REDUCED_SETTINGS = {"epochs": 5, "batch_size": 32}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0])
def test_distillation_pays_on_the_demo_data(tmp_path, seed):
    """The ordering the demo shows: the HR model well above the LR baseline, and the LR student
    distilled from it above the LR baseline."""
    from components import lr_baseline, prepare_data, student, teacher
    from kd_lib.config import from_dict

    generate_demo_dataset(str(tmp_path / "source"), **REDUCED)
    data = str(tmp_path / "data")
    prepare_data.run(from_dict(prepare_data.PrepareDataConfig, {"source": str(tmp_path / "source"), "out": data}))
    shared = {"data": data, "seed": seed, "num_workers": 0, **REDUCED_SETTINGS}

    def top1(module, cls, name, **fields):
        return 100 * module.run(from_dict(cls, {**shared, "out": str(tmp_path / name), **fields}))["final"]["val_top1"]

    hr = top1(teacher, teacher.TeacherConfig, "hr", arch="resnet18", lr=0.02)
    baseline = top1(lr_baseline, lr_baseline.LRBaselineConfig, "lr_baseline", lr=0.02)
    distilled = top1(student, student.StudentConfig, "student", assistant=str(tmp_path / "hr"))
    print(f"hr {hr:.1f}  lr_baseline {baseline:.1f}  student {distilled:.1f}")
    assert hr > baseline + 15 and distilled > baseline, (hr, baseline, distilled)
