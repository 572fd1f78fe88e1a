"""OrderedPool: results in input order, batches read ahead of the workers, worker errors raised here."""

import pytest

from kd_lib.data.parallel import OrderedPool


def square(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative item {x}")
    return x * x


@pytest.mark.parametrize("workers", [0, 2])
def test_map_ahead_reads_the_next_batch_before_it_waits_for_this_one(workers):
    events = []

    def batches():
        for number in range(3):
            events.append(f"read {number}")
            yield number, list(range(10 * number, 10 * number + 7))

    with OrderedPool(workers) as pool:
        for number, results in pool.map_ahead(square, batches()):
            events.append(f"used {number}")
            assert results == [x * x for x in range(10 * number, 10 * number + 7)]
    assert events == ["read 0", "read 1", "used 0", "read 2", "used 1", "used 2"]


def test_map_ahead_of_nothing_is_nothing():
    with OrderedPool(2) as pool:
        assert list(pool.map_ahead(square, iter([]))) == []


def test_an_error_in_a_worker_is_raised_with_its_message():
    with OrderedPool(2) as pool, pytest.raises(ValueError, match="negative item -3"):
        list(pool.map_ahead(square, [("a", [1, 2]), ("b", [4, -3, 5])]))
