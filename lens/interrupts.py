"""Ctrl-C and SIGTERM end a run the same way: records written, staging removed, summary final.

Batch schedulers and ``timeout`` send SIGTERM; a terminal sends SIGINT. Both
raise a ``KeyboardInterrupt`` (SIGTERM as its subclass ``Terminated``), so one
``except KeyboardInterrupt`` path writes the ``interrupted`` records. The exit
status follows the shell's convention, 128 + the signal: 130 and 143.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

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
