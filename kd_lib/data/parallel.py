"""The work of prepare-data spread over processes, one shard a task, results in order.

A worker makes a whole shard: it reads the shard's files, ``FILES_PER_READ``
at a time with one ``fs.cat`` (concurrent requests on object storage), makes
their rows (decode, check, letterbox), writes the shard and returns the
little the calling process keeps of each row (hashes, counts). The image
bytes never pass through the calling process, which hashes what it keeps
into the fingerprint in input order: the same data gives the same shards and
fingerprint whatever the number of workers. Workers start with the
platform's default method (forked on Linux, as the workers of torch's
``DataLoader``); fsspec gives a forked process its own filesystem instances.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TypeVar

from kd_lib.io.fs import filesystem, join

T = TypeVar("T")
R = TypeVar("R")

#: Files read with one ``fs.cat``.
FILES_PER_READ = 64
#: Tasks queued or running per worker.
TASKS_AHEAD = 2


def read_and_apply(function: Callable[[T, bytes, str], R], root: str, items: Sequence[T],
                   path: Callable[[T], str]) -> list[R]:
    """``function(item, data, uri)`` for each of ``items``, in order, where ``uri`` is ``root/path(item)``
    and ``data`` its bytes, the files read ``FILES_PER_READ`` at a time, each batch with one ``fs.cat``."""
    fs, base = filesystem(root)
    results = []
    for start in range(0, len(items), FILES_PER_READ):
        batch = items[start:start + FILES_PER_READ]
        paths = [path(item) for item in batch]
        blobs = fs.cat([f"{base}/{name}" for name in paths])
        results += [function(item, blobs[f"{base}/{name}"], join(root, name)) for item, name in zip(batch, paths)]
    return results


class OrderedPool:
    """:meth:`map` over ``num_workers`` processes (0: in the calling process), results in input order.

    A context manager: the processes start on entry and stop on exit, after
    the tasks they run (queued ones are cancelled). At most ``TASKS_AHEAD``
    tasks per worker are queued or running. An exception in a worker is
    raised again here, with its own type and message.
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

    def map(self, function: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:
        """``function(task)`` for each of ``tasks``, in order (``function`` must be picklable: a
        module-level function or a :func:`functools.partial` of one)."""
        if self._pool is None:
            yield from map(function, tasks)
            return
        pending: deque[Future] = deque()
        for task in tasks:
            pending.append(self._pool.submit(function, task))
            if len(pending) >= TASKS_AHEAD * self.num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
