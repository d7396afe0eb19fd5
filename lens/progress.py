"""The one progress display of lens: a line on stderr, redrawn in place.

Every long-running command uses it (``lens.run`` single runs and sweep workers:
model, stage, fact, pass and layer; ``lens.prism_fit``: prompts collected). It
draws only when its stream is a terminal and ``--quiet`` is off, so logs, pipes
and tests see nothing of it. No dependency: a carriage return and an
erase-line escape redraw the line.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

_CLEAR = "\r\x1b[K"


class Progress:
    """Draws ``[i/n] model · fact f/F (id) · what · layer l/L`` in place.

    Args:
        quiet: ``--quiet``: draw nothing.
        stream: Where to draw (stderr).
        prefix: Shown first, e.g. ``[2/10] Qwen3-8B``.
        interval: Seconds between redraws of layer updates.
    """

    def __init__(self, *, quiet: bool = False, stream: TextIO | None = None, prefix: str = "",
                 interval: float = 0.1) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = not quiet and bool(isatty and isatty())
        self.prefix = prefix
        self.interval = interval
        self._drawn = False
        self._last = 0.0
        self._fact = ""

    def show(self, text: str) -> None:
        """Replace the line with ``prefix · text``."""
        if not self.enabled:
            return
        line = f"{self.prefix} · {text}" if self.prefix else text
        width = shutil.get_terminal_size((80, 20)).columns - 1
        self.stream.write(_CLEAR + line[:width])
        self.stream.flush()
        self._drawn = True
        self._last = time.monotonic()

    def layer(self, what: str, layer: int, n_layers: int) -> None:
        """A layer of a pass was decoded (redrawn at most every ``interval`` seconds)."""
        if self.enabled and (layer == n_layers or time.monotonic() - self._last >= self.interval):
            self.show(f"{self._fact}{what} · layer {layer}/{n_layers}")

    def fact(self, done: int, total: int, fact_id: str) -> None:
        """Facts of a multi-fact probe finished (``analyse``'s ``fact_progress``): shown
        before the pass and layer from now on."""
        self._fact = f"fact {done}/{total} ({fact_id}) · "
        self.show(self._fact.removesuffix(" · "))

    def clear(self) -> None:
        """Erase the line before ordinary output."""
        if self._drawn:
            self.stream.write(_CLEAR)
            self.stream.flush()
            self._drawn = False


class SweepStatus:
    """The sweep-level line ``[done/total] running: a, b`` for every launcher.

    On a terminal it is redrawn in place (a local worker draws its own stage and
    layer after the same prefix); in a log each change is a line of its own, so a
    cluster job's log shows what ran when. ``--quiet`` shows nothing.
    """

    def __init__(self, total: int, *, done: int = 0, quiet: bool = False,
                 stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.quiet = quiet
        self.total = total
        self.done = done
        self.running: list[str] = []
        self._drawn = False

    def line(self) -> str:
        return f"[{self.done}/{self.total}] running: {', '.join(self.running) or '-'}"

    def started(self, model: str) -> None:
        self.running.append(model)
        self._draw()

    def finished(self, model: str) -> None:
        if model in self.running:
            self.running.remove(model)
        self.done += 1
        self._draw()

    def _draw(self) -> None:
        if self.quiet:
            return
        if self.tty:
            width = shutil.get_terminal_size((80, 20)).columns - 1
            self.stream.write(_CLEAR + self.line()[:width])
            self._drawn = True
        else:
            self.stream.write(f"lens: {self.line()}\n")
        self.stream.flush()

    def clear(self) -> None:
        """Erase the line before ordinary output."""
        if self._drawn:
            self.stream.write(_CLEAR)
            self.stream.flush()
            self._drawn = False
