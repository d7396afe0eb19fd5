"""Wall-clock seconds per stage of a run, so a user sees where the time goes.

A ``StageTimer`` is handed explicitly to whatever it times (no globals). Its
numbers never enter the byte-reproducible outputs: the CLI writes them to a
separate ``output-<name>-timings.json`` (see the README).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class StageTimer:
    """Accumulate wall-clock seconds per named stage.

    A name may contain ``/``: ``"passes/pos/orig"`` is reported as
    ``{"passes": {"pos/orig": s}}`` (split at the first ``/`` only). Entering a
    stage twice adds up; stages may nest (their times then overlap). Stages are
    reported in the order they were first entered, then ``total``: the seconds
    since the timer was made.
    """

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._seconds: dict[str, float] = {}
        self._running: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the body of a ``with`` block as ``name``."""
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def start(self, name: str) -> None:
        """Start timing ``name`` (for code that a ``with`` block would re-indent)."""
        self._seconds.setdefault(name, 0.0)
        self._running[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        """Stop timing ``name`` and add the seconds since its ``start``."""
        self._seconds[name] += time.perf_counter() - self._running.pop(name)

    def iterate(self, name: str, items: Iterable[T]) -> Iterator[T]:
        """Yield from ``items``, timing only the work of producing each item as ``name``."""
        self._seconds.setdefault(name, 0.0)
        iterator = iter(items)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                self._seconds[name] += time.perf_counter() - start
                return
            self._seconds[name] += time.perf_counter() - start
            yield item
            del item  # hold nothing while the producer makes the next item

    def seconds(self, name: str) -> float:
        """Seconds accumulated under ``name`` (0 if never entered)."""
        return self._seconds.get(name, 0.0)

    def total(self) -> float:
        """Seconds since the timer was made."""
        return time.perf_counter() - self._start

    def as_dict(self) -> dict[str, Any]:
        """Stages (nested at the first ``/``) in first-entry order, then ``total``.

        Seconds are rounded to microseconds: finer digits are clock noise.
        """
        out: dict[str, Any] = {}
        for name, seconds in self._seconds.items():
            group, sep, rest = name.partition("/")
            if sep:
                out.setdefault(group, {})[rest] = round(seconds, 6)
            else:
                out[name] = round(seconds, 6)
        out["total"] = round(self.total(), 6)
        return out

    def summary(self) -> str:
        """One line: ``load 3.100s, passes 0.500s, …, total 5.200s`` (stages and passes;
        ``passes/all`` is shown as ``passes``)."""
        parts = []
        for name, value in self.as_dict().items():
            if isinstance(value, dict):
                if name == "passes":
                    parts.extend(f"{'passes' if k == 'all' else k} {v:.3f}s"
                                 for k, v in value.items())
            else:
                parts.append(f"{name} {value:.3f}s")
        return ", ".join(parts)


def maybe_stage(timer: StageTimer | None, name: str) -> contextlib.AbstractContextManager[None]:
    """``timer.stage(name)``, or a no-op without a timer."""
    return timer.stage(name) if timer is not None else contextlib.nullcontext()


def maybe_iterate(timer: StageTimer | None, name: str, items: Iterable[T]) -> Iterable[T]:
    """``timer.iterate(name, items)``, or ``items`` without a timer."""
    return timer.iterate(name, items) if timer is not None else items
