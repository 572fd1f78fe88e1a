"""OrderedPool.map: tasks run by workers, results in input order, worker errors raised here; read_and_apply:
each file read in batches and given to the function with its URI."""

import pytest

from kd_lib.data import parallel
from kd_lib.data.parallel import OrderedPool, read_and_apply


def tagged(item: int, data: bytes, uri: str) -> tuple[int, bytes, str]:
    if item < 0:
        raise ValueError(f"negative item {item} in {uri}")
    return item, data, uri


def read_all(task: tuple[str, list[int]]) -> list[tuple[int, bytes, str]]:
    root, items = task
    return read_and_apply(tagged, root, items, lambda item: f"{abs(item)}.bin")


@pytest.fixture
def files(tmp_path):
    """Files 0.bin .. 9.bin holding their own number, and their items 0 .. 9."""
    for number in range(10):
        (tmp_path / f"{number}.bin").write_bytes(bytes([number]) * (number + 1))
    return tmp_path, list(range(10))


def test_read_and_apply_gives_each_item_its_bytes_and_uri_in_order(files, monkeypatch):
    monkeypatch.setattr(parallel, "FILES_PER_READ", 3)  # four reads
    root, items = files
    assert read_all((str(root), items)) == [(n, bytes([n]) * (n + 1), f"{root}/{n}.bin") for n in items]


@pytest.mark.parametrize("workers", [0, 2])
def test_map_gives_the_results_in_order(files, workers):
    root, items = files
    tasks = [(str(root), items[start:start + 2]) for start in range(0, 10, 2)]  # five, more than run at once
    with OrderedPool(workers) as pool:
        results = list(pool.map(read_all, tasks))
    assert results == [read_all(task) for task in tasks]


def test_map_of_nothing_is_nothing():
    with OrderedPool(2) as pool:
        assert list(pool.map(read_all, [])) == []


def test_an_error_in_a_worker_is_raised_with_its_message(files):
    root, items = files
    items[7] = -7
    with OrderedPool(2) as pool, pytest.raises(ValueError, match=r"negative item -7 in .*7\.bin"):
        list(pool.map(read_all, [(str(root), items[start:start + 2]) for start in range(0, 10, 2)]))


def test_negative_workers_are_refused():
    with pytest.raises(ValueError, match="num_workers must be >= 0, got -1"):
        OrderedPool(-1)
