"""Ctrl-C and SIGTERM end a run the same way: records written, staging removed, summary final.

Batch schedulers and ``timeout`` send SIGTERM; a terminal sends SIGINT. Both
raise a ``KeyboardInterrupt`` (SIGTERM as its subclass ``Terminated``), so one
``except KeyboardInterrupt`` path writes the ``interrupted`` records. The exit
status follows the shell's convention, 128 + the signal: 130 and 143.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import NoReturn

INTERRUPTED = 130
TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C."""


def exit_status(exc_or_class: BaseException | str | None) -> int:
    """130 after Ctrl-C, 143 after SIGTERM (given the exception or its class name)."""
    name = exc_or_class if isinstance(exc_or_class, str) else type(exc_or_class).__name__
    return TERMINATED if name == Terminated.__name__ else INTERRUPTED


def _terminate_once(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


def _interrupt_once(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


@contextlib.contextmanager
def handled(*, sigint_once: bool = False) -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` once (later ones are ignored while
    the records are written); with ``sigint_once`` Ctrl-C likewise. Handlers are restored
    after (the CLI also runs inside pytest). Outside the main thread: a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _terminate_once)}
    if sigint_once:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _interrupt_once)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def exit_now(status: int) -> NoReturn:
    """End a finished ``python -m lens.run`` (or sweep worker) without the interpreter's teardown.

    By the time ``main`` returns, every file is written atomically and closed,
    Ray is shut down and worker processes are reaped; what the teardown would
    still do is free the model and unload torch and transformers: 0.5-1.5 s
    that every run would wait for, for nothing. The standard streams and
    logging are flushed first. A ``main`` that raises never gets here: its
    traceback and exit are Python's own.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)
