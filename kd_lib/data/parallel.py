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
C = TypeVar("C")


class OrderedPool:
    """``map`` over ``num_workers`` processes (0: in the calling process), results in input order.

    A context manager: the processes start on entry and stop on exit. The
    caller reads its data in bounded batches: :meth:`map` takes one, and
    :meth:`map_ahead` takes an iterable of them and keeps the workers busy with
    one batch while the caller reads the next, so memory holds two batches of
    inputs and results at a time. An exception in a worker is raised again
    here, with its own type and message.
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

    def map_ahead(self, function: Callable[[T], R], batches: Iterable[tuple[C, list[T]]]
                  ) -> Iterator[tuple[C, list[R]]]:
        """``(context, [function(item) for item in items])`` for each ``(context, items)`` of ``batches``,
        in order. Batch ``i + 1`` is drawn from ``batches`` (read, when ``batches`` is a generator that
        reads) and handed to the workers before batch ``i``'s results are awaited, so the caller's reading
        and its use of the results overlap the workers' work. ``context`` stays in this process."""
        pending = None
        for context, items in batches:
            submitted = context, self.map(function, items)
            if pending is not None:
                yield pending[0], list(pending[1])
            pending = submitted
        if pending is not None:
            yield pending[0], list(pending[1])
