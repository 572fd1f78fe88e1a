"""Per-file work of prepare-data (read, decode, check, letterbox) spread over processes, results in order.

The workers read the files themselves, a batch at a time with one ``fs.cat``
(concurrent requests on object storage), and return what the caller keeps.
Hashing into the fingerprint and writing shards stay in the calling process,
in input order, so the same data gives the same shards and fingerprint
whatever the number of workers. Workers start with the platform's default
method (forked on Linux, as the workers of torch's ``DataLoader``); fsspec
gives a forked process its own filesystem instances.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TypeVar

from kd_lib.io.fs import filesystem, join

T = TypeVar("T")
R = TypeVar("R")

#: Files a worker reads in one ``fs.cat`` and processes as one task.
FILES_PER_TASK = 64
#: Tasks queued or running per worker: bounds the memory held by read files and results.
TASKS_AHEAD = 2


def read_and_apply(function: Callable[[T, bytes, str], R], root: str, items: list[T],
                   paths: list[str]) -> list[R]:
    """``function(item, bytes of root/path, uri)`` for each item and its path, the files read in one ``fs.cat``."""
    fs, base = filesystem(root)
    blobs = fs.cat([f"{base}/{path}" for path in paths])
    return [function(item, blobs[f"{base}/{path}"], join(root, path)) for item, path in zip(items, paths)]


class OrderedPool:
    """:meth:`map_files` over ``num_workers`` processes (0: in the calling process), results in input order.

    A context manager: the processes start on entry and stop on exit. At most
    ``TASKS_AHEAD`` tasks of ``FILES_PER_TASK`` files per worker are in flight,
    so memory holds a bounded number of files and results. An exception in a
    worker is raised again here, with its own type and message.
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

    def map_files(self, function: Callable[[T, bytes, str], R], root: str, items: Sequence[T],
                  path: Callable[[T], str]) -> Iterator[R]:
        """``function(item, data, uri)`` for each of ``items``, in order, where ``uri`` is
        ``root/path(item)`` and ``data`` its bytes, read by the process that runs ``function``
        (which must be picklable: a module-level function or a :func:`functools.partial` of one)."""
        chunks = (items[i:i + FILES_PER_TASK] for i in range(0, len(items), FILES_PER_TASK))
        tasks = ((chunk, [path(item) for item in chunk]) for chunk in chunks)
        if self._pool is None:
            for chunk, paths in tasks:
                yield from read_and_apply(function, root, chunk, paths)
            return
        pending: deque[Future] = deque()
        for chunk, paths in tasks:
            pending.append(self._pool.submit(read_and_apply, function, root, chunk, paths))
            if len(pending) >= TASKS_AHEAD * self.num_workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
