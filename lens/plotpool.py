"""Plots off the critical path: worker processes that import matplotlib while the model loads.

A run's PNGs need only its records, and their cost is matplotlib: about half
a second to import, then a fraction of a second per figure, in pure Python
that holds one core. ``PlotPool`` starts its workers (``python -m
lens.plotpool``) when a run starts, so their import runs beside the model
load, which leaves cores idle; at write time the figures (``lens.plots.PlotJob``)
are spread over the workers and drawn in parallel, and the run's own process
never imports matplotlib. The bytes are those of drawing in process: the same
code and style. A worker that cannot start or that fails leaves its figures
to be drawn in process, so a pool changes how fast the PNGs come, never what
they are.

Protocol: a job list goes to a worker's stdin as one length-prefixed pickle;
the worker answers with one length-prefixed pickle, ``{file: png bytes}``, or
closes its stdout. It exits at end of input, at once (``os._exit``: the run
waits for it). Its stderr is discarded: the
in-process fallback reports any real error the normal way.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from lens.plots import PlotJob

MAX_WORKERS = 4
NICENESS = 19
"""Workers run at the lowest priority: their import must not slow the model load."""
_LENGTH = struct.Struct("<Q")


def _send(stream: IO[bytes], obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        raise EOFError("the plot worker closed its output")
    (size,) = _LENGTH.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the plot worker's answer was cut short")
    return pickle.loads(data)  # noqa: S301 - our own child process, over a private pipe


class PlotPool:
    """Up to ``workers`` plot processes, started now, used once by ``draw``, then closed
    (``close``, or the end of a ``with`` block)."""

    def __init__(self, workers: int) -> None:
        root = str(Path(__file__).resolve().parents[1])  # this very lens in the workers
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self._procs: list[subprocess.Popen[bytes]] = []
        for _ in range(max(0, workers)):
            try:
                self._procs.append(subprocess.Popen(
                    [sys.executable, "-m", "lens.plotpool"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env))
            except OSError:
                break  # fewer workers (or none): the rest is drawn in process
            with contextlib.suppress(OSError, AttributeError):  # from its first instruction on
                os.setpriority(os.PRIO_PROCESS, self._procs[-1].pid, NICENESS)

    def __enter__(self) -> PlotPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def size(self) -> int:
        return len(self._procs)

    def draw(self, jobs: Sequence[PlotJob]) -> dict[str, bytes]:
        """Every job's PNG, keyed by its file name, in the order of ``jobs``.

        Jobs are dealt out round-robin; whatever a worker does not return is
        drawn in this process.
        """
        shares: list[list[PlotJob]] = [[] for _ in self._procs]
        for i, job in enumerate(jobs):
            if shares:
                shares[i % len(shares)].append(job)
        sent = []
        for proc, share in zip(self._procs, shares, strict=True):
            if not share:
                continue
            try:
                _send(proc.stdin, share)  # type: ignore[arg-type]
                sent.append(proc)
            except OSError:
                continue
        drawn: dict[str, bytes] = {}
        for proc in sent:
            try:
                drawn.update(_receive(proc.stdout))  # type: ignore[arg-type]
            except (EOFError, OSError, pickle.UnpicklingError):
                continue
        return {job.file: drawn[job.file] if job.file in drawn else job.draw() for job in jobs}

    def close(self) -> None:
        """End every worker: close its input (it exits), kill it if it does not."""
        for proc in self._procs:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # type: ignore[union-attr]
        for proc in self._procs:
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            with contextlib.suppress(OSError):
                proc.stdout.close()  # type: ignore[union-attr]
        self._procs = []


def workers_for(n_jobs: int) -> int:
    """Workers worth starting for ``n_jobs`` figures: one per core, at most ``MAX_WORKERS``."""
    return max(0, min(n_jobs, os.cpu_count() or 1, MAX_WORKERS))


def serve(stdin: IO[bytes], stdout: IO[bytes]) -> None:
    """A worker's loop: draw each job list that comes in, until end of input.

    It runs at a lower priority (``NICENESS``, set by the pool as it starts):
    its start-up import should take only the cores the model load leaves idle;
    when it draws, the run is waiting for it anyway.
    """
    from lens.plotkit import warm_up

    warm_up()
    while True:
        try:
            jobs = _receive(stdin)
        except EOFError:
            return
        _send(stdout, {job.file: job.draw() for job in jobs})


if __name__ == "__main__":
    # Ctrl-C reaches the whole process group: the run reports it, not its plot workers
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        serve(sys.stdin.buffer, sys.stdout.buffer)
    os._exit(0)  # everything is sent: no interpreter teardown for the run to wait on
