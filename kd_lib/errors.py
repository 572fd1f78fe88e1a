"""The kinds of failure a user can fix, and how every entry point reports them.

One type per kind, each printed as one or two lines that name the file, the
field or the URI and say what to do:

=====================  =====================================================  ====
kind                   raised when                                            exit
=====================  =====================================================  ====
``ConfigError``        a field or flag is unknown, missing or bad; ``out``       2
                       is another stage's output or one of the inputs; an
                       architecture, a device or a category does not exist
``DataError``          a dataset or a stage output is unusable: damaged,         1
                       degenerate, not what its manifest promises
``StorageError``       a location cannot be read or written, or does not         1
                       answer within ``storage_timeout``
``CheckpointError``    no checkpoint to resume from is readable                  1
``BusyError``          another run holds the lease on ``out``                    1
``ModelKindError``     a model of the wrong kind (a detector for a classifier)   1
=====================  =====================================================  ====

Interrupted runs exit ``128 + signal`` (130 on SIGINT, start-up included).
``--debug`` or ``KDP_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
DEBUG_ENV = "KDP_DEBUG"
EXIT_FAILURE, EXIT_USAGE, EXIT_SIGINT = 1, 2, 128 + signal.SIGINT


class KDError(Exception):
    """A failure the user can fix; the message names what failed and says what to do."""


class DataError(KDError, ValueError):
    """A dataset or stage output is unusable; the message names the file or folder."""


class StorageError(KDError, OSError):
    """A location could not be read or written; the message names it."""


class BusyError(KDError):
    """Another run is writing the same output (it holds its lease); the message names it."""


class CheckpointError(KDError):
    """No readable checkpoint to resume from; the message names it and says how to start over."""


class ModelKindError(KDError, ValueError):
    """A model of another kind than the stage takes (a detector given as a classifier, ...)."""


#: Failures of a run that are not bugs: exit status 1. ``FloatingPointError``: a loss that became NaN.
RUN_FAILURES = (KDError, FileNotFoundError, FloatingPointError)


def take_debug_flag(argv: list[str] | None) -> tuple[list[str], bool]:
    """``argv`` (default: ``sys.argv[1:]``) without ``--debug``, and whether tracebacks are wanted:
    ``--debug`` was there or ``KDP_DEBUG`` is set to a true value."""
    argv = list(sys.argv[1:] if argv is None else argv)
    flag = "--debug" in argv
    env = os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes", "on")
    return [a for a in argv if a != "--debug"], flag or env


def exit_code(err: BaseException, failures: tuple[type[BaseException], ...] = ()) -> int | None:
    """The exit status for ``err``, or None when it is not a failure the user can fix (a bug).
    ``failures``: more types that exit 1 at this entry point."""
    from kd_lib.config import ConfigError  # here: the console script imports this module first, and fast

    if isinstance(err, KeyboardInterrupt):
        return EXIT_SIGINT
    if isinstance(err, ConfigError):
        return EXIT_USAGE
    signum = getattr(err, "signum", None)  # kd_lib.engine.loop.TrainingInterrupted
    if isinstance(signum, int):
        return 128 + signum
    if isinstance(err, RUN_FAILURES + failures):
        return EXIT_FAILURE
    return None


def report(prog: str, err: BaseException, debug: bool = False,
           failures: tuple[type[BaseException], ...] = ()) -> int:
    """Print ``err`` as ``prog: error: ...`` (with its traceback when ``debug``) and return the exit
    status; re-raise an error that is not a user's to fix."""
    code = exit_code(err, failures)
    if code is None:
        raise err
    if debug:
        traceback.print_exception(err)
    if isinstance(err, KeyboardInterrupt):
        print(f"{prog}: interrupted; run the same command again to go on (a training stage resumes from "
              "its last checkpoint)", file=sys.stderr)
    elif code > 128:
        print(f"{prog}: {err}; run the same command again to resume", file=sys.stderr)
    else:
        print(f"{prog}: error: {err}", file=sys.stderr)
    return code


def guarded(prog: str, body: Callable[[], int | None], debug: bool = False,
            failures: tuple[type[BaseException], ...] = ()) -> int:
    """Run ``body`` and turn a user's failure into its message and exit status (see the module table)."""
    try:
        return body() or 0
    except (Exception, KeyboardInterrupt) as err:  # report() re-raises what is not a user's failure
        return report(prog, err, debug, failures)


def exit_on_failure(prog: str, body: Callable[[], T]) -> T:
    """``body()``; a user's failure is printed as by :func:`guarded` and ends the process with its exit
    status (the KFP entry, where nothing above would print it as one line)."""
    try:
        return body()
    except (Exception, KeyboardInterrupt) as err:
        raise SystemExit(report(prog, err, take_debug_flag([])[1])) from None


@contextlib.contextmanager
def quiet_interrupt(prog: str) -> Iterator[None]:
    """Exit 130 with one line, not a traceback, when SIGINT arrives inside the block (start-up imports)."""
    try:
        yield
    except KeyboardInterrupt as err:
        sys.exit(report(prog, err, take_debug_flag(None)[1]))
