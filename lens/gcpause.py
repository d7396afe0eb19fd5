"""The cyclic garbage collector kept out of the way while a run builds long-lived objects.

A full collection walks every tracked object. With a model loaded (hundreds
of thousands of objects) one takes 0.2-0.3 s, and loading SmolLM2-135M
triggered five of them (0.84 s of a 5 s load); drawing a figure or building
a many-fact probe's records triggers more. Nothing is lost while the
collector is paused: reference counting still frees almost everything, and
cycles made meanwhile are found once it runs again.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Any


class paused_gc(contextlib.ContextDecorator):  # noqa: N801 - used like a function
    """Pause the cyclic collector for a block (or a decorated call); nesting is safe."""

    def __enter__(self) -> paused_gc:
        self._was_enabled = gc.isenabled()
        gc.disable()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._was_enabled:
            gc.enable()


def freeze_loaded() -> bool:
    """Move every object alive now out of the collector's reach, until ``thaw``.

    For the run of one model: the model lives until the run ends, so the
    collections made meanwhile need not walk it again. Returns whether this
    call froze anything that ``thaw`` should give back: nothing when someone
    else froze objects before (their freeze is theirs to undo).
    """
    if gc.get_freeze_count():
        return False
    gc.freeze()
    return True


def thaw(froze: bool) -> None:
    """Give the objects ``freeze_loaded`` froze back to the collector (a process that goes
    on after the run, like a test session, can then collect the model's cycles)."""
    if froze:
        gc.unfreeze()
