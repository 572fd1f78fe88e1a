"""Per-image work of prepare-data (decode, check, letterbox) spread over processes, results in order.

Only the per-image function runs in the workers. Reading, hashing into the
fingerprint and writing shards stay in the calling process, in input order,
so the same data gives the same shards and fingerprint whatever the number of
workers. Workers start with the platform's default method (forked on Linux,
as the workers of torch's ``DataLoader``): the per-image functions use only
Pillow, NumPy and hashlib, none of the caller's threads or open files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


class OrderedPool:
    """``map`` over ``num_workers`` processes (0: in the calling process), results in input order.

    A context manager: the processes start on entry and stop on exit. Each
    :meth:`map` call takes a bounded batch (the caller reads its data in
    batches), so memory holds one batch of inputs and results at a time. An
    exception in a worker is raised again here, with its own type and message.
    """

    def __init__(self, num_workers: int):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.num_workers = num_workers
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> OrderedPool:
        if self.num_workers:
            self._pool = ProcessPoolExecutor(self.num_workers)
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def map(self, function: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """``function`` applied to each of ``items``, in order (``function`` must be picklable: a
        module-level function or a :func:`functools.partial` of one)."""
        if self._pool is None:
            return map(function, items)
        items = list(items)
        return self._pool.map(function, items, chunksize=max(1, len(items) // (4 * self.num_workers)))
