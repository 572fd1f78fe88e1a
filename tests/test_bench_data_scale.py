"""bench/data_scale.py at tiny sizes: every measure is taken, on the items the loaders really gave."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import data_scale  # noqa: E402


@pytest.mark.slow
def test_every_measure_is_written_and_the_misses_follow_from_them(tmp_path, capsys):
    threads = data_scale.torch.get_num_threads()
    code = data_scale.main(["--sizes", "700", "640", "--batches", "3", "--photos", "150", "--photo-side", "64",
                            "--photo-hr", "32", "--repeats", "2", "--main-threads", "1",
                            "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results")])
    result = json.loads((tmp_path / "results" / "data_scale.json").read_text())
    assert result["setup"]["sizes"] == [640, 700] and list(result["rss_mib"]) == ["640", "700"]
    assert result["setup"]["main_threads"] == 1 and data_scale.torch.get_num_threads() == threads
    for measure in ("loader_img_per_s", "loader_img_per_s_photos"):
        assert set(result[measure]) == {"project", "project_unverified", "official_style"}
    for measure in ("prepare_img_per_s", "prepare_img_per_s_photos"):
        assert set(result[measure]) == {"1", "2"}
    rates = [value for measure, values in result.items() if measure not in ("setup", "missed")
             for value in values.values()]
    assert len(rates) == 13 and all(rate > 0 for rate in rates)
    assert result["missed"] == data_scale.misses(result) and code == (1 if result["missed"] else 0)
    printed = capsys.readouterr().out
    assert (tmp_path / "results" / "data_scale.md").read_text() in printed
    assert all(f"missed: {line}" in printed for line in result["missed"])


def test_a_loader_rate_counts_the_items_after_the_first_batch_only(monkeypatch):
    """150 images in batches of 64: the batches after the first hold 64 + 22 items, not 2 x 64."""
    clock = iter(range(10))
    monkeypatch.setattr(data_scale.time, "perf_counter", lambda: float(next(clock)))
    batches = [[list(range(n))] for n in (64, 64, 22)]
    assert data_scale.timed_rate(batches, lambda batch: None, data_scale.torch.device("cpu")) == 86 / 1


def test_each_rate_is_the_median_of_its_repeats():
    runs = iter([{"project": 5.0, "official_style": 1.0}, {"project": 9.0, "official_style": 3.0},
                 {"project": 7.0, "official_style": 2.0}])
    assert data_scale.median_rate(lambda: next(runs), 3) == {"project": 7.0, "official_style": 2.0}
