"""One writer per output: a lease on ``OUT/.lease``, taken before a stage works and given back after.

The lease is created exclusively, so that of two writers exactly one gets it:
on the local disk with ``O_EXCL`` (``open(..., "xb")``), on GCS with the
precondition ``ifGenerationMatch=0`` (gcsfs's ``pipe_file(..., mode="create")``;
its ``"xb"`` files do not send it), in memory by fsspec's own check. It names its holder: host, pid, start time and the task,
and expires ``LEASE_SECONDS`` after it was last renewed (every
``RENEW_SECONDS``, by a thread of the holder). A second writer fails at once
with :class:`~kd_lib.errors.BusyError` naming the holder, unless the lease is

- its own (the same process: a stage run again in it);
- stale: its holder's process is gone (same host) or it expired;
- an earlier attempt of the same task: ``KDP_TASK`` names the task (a KFP
  task sets it; its output URI is its own, so a retry finds the lease of the
  attempt it replaces).

Then it takes the lease over and logs whose it was.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from fsspec.implementations.local import LocalFileSystem

from kd_lib.errors import BusyError
from kd_lib.io.fs import filesystem, join, read_text, remove, remove_if_empty, write_text

LEASE = ".lease"
#: Seconds a lease lasts after its last renewal, and between renewals.
LEASE_SECONDS, RENEW_SECONDS = 300.0, 60.0
#: The environment variable naming the task a process runs for (its retries share it).
TASK_ENV = "KDP_TASK"

log = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """The lease on the output ``out`` (module docstring); a context manager that takes it and gives it back."""

    def __init__(self, out: str):
        self.out, self.uri = out, join(out, LEASE)
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(),
                       "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "task": os.environ.get(TASK_ENV, ""), "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, daemon=True, name=f"lease {out}")

    def __enter__(self) -> Lease:
        if not self._create():
            holder = self._read()
            why = self._stale(holder)
            if why is None:
                raise self._busy(holder)
            log.warning("%s: taking over the lease of %s (%s)", self.out, describe(holder), why)
            remove(self.uri)
            if not self._create():
                raise self._busy(self._read())
        self._renewer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._renewer.join()
        if self._read().get("token") == self.holder["token"]:
            remove(self.uri)
            remove_if_empty(self.out)  # a run that failed before writing leaves no folder behind

    def _record(self) -> bytes:
        return json.dumps({**self.holder, "expires": time.time() + LEASE_SECONDS}).encode()

    def _create(self) -> bool:
        """Whether this process created the lease file (it did not exist)."""
        fs, path = filesystem(self.uri)
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        try:
            if isinstance(fs, LocalFileSystem):  # fsspec's "create" checks first, then writes: open with O_EXCL
                with fs.open(path, "xb") as f:
                    f.write(self._record())
            else:  # gcsfs: ifGenerationMatch=0 (its "xb" files do not send it)
                fs.pipe_file(path, self._record(), mode="create")
        except FileExistsError:
            return False
        return True

    def _read(self) -> dict:
        """The holder of the lease; ``{}`` when there is none, or it is being written."""
        try:
            return json.loads(read_text(self.uri))
        except (FileNotFoundError, ValueError):
            return {}

    def _busy(self, holder: dict) -> BusyError:
        return BusyError(f"{self.out} is being written by {describe(holder)} ({self.uri}): one writer per output; "
                         "wait for it to finish or choose another out")

    def _stale(self, holder: dict) -> str | None:
        """Why the lease of ``holder`` may be taken over, or None when it may not (an unreadable one may not:
        its holder may be writing it)."""
        if not holder:
            return None
        if holder.get("host") == self.holder["host"] and holder.get("pid") == self.holder["pid"]:
            return "this process"
        if self.holder["task"] and holder.get("task") == self.holder["task"]:
            return f"an earlier attempt of task {holder['task']}"
        if holder.get("host") == self.holder["host"] and not _alive(int(holder["pid"])):
            return "its process is gone"
        if holder.get("expires", 0) < time.time():
            return "it expired"
        return None

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_SECONDS):
            if self._read().get("token") == self.holder["token"]:
                write_text(self.uri, self._record().decode())


def describe(holder: dict) -> str:
    """``host pid N since TIME``, from a lease's holder."""
    return f"{holder.get('host', '?')} pid {holder.get('pid', '?')} since {holder.get('started', '?')}"
