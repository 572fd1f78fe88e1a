"""OrderedPool.map_files: each file read and processed by a worker, results in input order, worker errors
raised here."""

import pytest

from kd_lib.data import parallel
from kd_lib.data.parallel import OrderedPool


def tagged(item: int, data: bytes, uri: str) -> tuple[int, bytes, str]:
    if item < 0:
        raise ValueError(f"negative item {item} in {uri}")
    return item, data, uri


@pytest.fixture
def files(tmp_path):
    """Files 0.bin .. 9.bin holding their own number, and their items 0 .. 9."""
    for number in range(10):
        (tmp_path / f"{number}.bin").write_bytes(bytes([number]) * (number + 1))
    return tmp_path, list(range(10))


@pytest.mark.parametrize("workers", [0, 2])
def test_map_files_gives_each_item_its_bytes_and_uri_in_order(files, workers, monkeypatch):
    monkeypatch.setattr(parallel, "FILES_PER_TASK", 3)  # four tasks, more than the workers take at once
    root, items = files
    with OrderedPool(workers) as pool:
        results = list(pool.map_files(tagged, str(root), items, lambda item: f"{abs(item)}.bin"))
    assert results == [(n, bytes([n]) * (n + 1), f"{root}/{n}.bin") for n in items]


def test_map_files_of_nothing_is_nothing(tmp_path):
    with OrderedPool(2) as pool:
        assert list(pool.map_files(tagged, str(tmp_path), [], str)) == []


def test_an_error_in_a_worker_is_raised_with_its_message(files, monkeypatch):
    monkeypatch.setattr(parallel, "FILES_PER_TASK", 2)
    root, items = files
    items[7] = -7
    with OrderedPool(2) as pool, pytest.raises(ValueError, match=r"negative item -7 in .*7\.bin"):
        list(pool.map_files(tagged, str(root), items, lambda item: f"{abs(item)}.bin"))
