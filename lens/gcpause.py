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


def freeze_loaded() -> None:
    """Move every object alive now out of the collector's reach for the rest of the process.

    For a process that runs one model and ends (``python -m lens.run``, a sweep
    worker): the model lives until the end, so later collections need not walk
    it again. Cycles already unreachable are kept too, which a process of one
    run can afford; the API (a notebook) never calls this.
    """
    gc.freeze()
