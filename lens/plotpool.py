"""Plots off the critical path: worker processes that import matplotlib while the model loads.

A run's PNGs need only its records, and their cost is matplotlib: about half
a second to import, then a fraction of a second per figure, in pure Python
that holds one core. ``PlotPool`` starts its workers (``python -m
lens.plotpool``) when a run starts, so their import runs beside the model
load, which leaves cores idle, and so does what each worker prepares for the
kind of figure it is given first (``roles``: the trajectories, the heatmaps;
``lens.plotprep``). A many-fact probe hands each fact's heatmap to the pool
as soon as the fact's passes are done (``submit``) where the decode leaves a
core idle (``draw_beside_decode``: a GPU run, or a CPU with cores torch does
not use); elsewhere every heatmap waits for the write. At write time the
rest of the figures (``lens.plots.PlotJob``) join one queue, the
trajectories (the longest) ahead of the heatmaps still waiting, while the
run serialises its CSVs; each worker takes the next figure when it is free,
one of its kind first, and the run's own process never imports matplotlib.
The bytes are those of drawing in process: the same code and style. A worker
that cannot start or that fails leaves its figures to be drawn in process,
so a pool changes how fast the PNGs come, never what they are.

Protocol: a job list goes to a worker's stdin as one length-prefixed pickle;
the worker answers with one length-prefixed pickle, ``{file: png bytes}``, or
closes its stdout. One thread per worker in the run's process sends it a list
and waits for the answer before the next, so neither side ever blocks on a
full pipe while the run decodes. A ``lens.plotprep.Prepare`` message gets no
answer. A worker exits at end of input (``os._exit``), or is killed if it is
still preparing. Its stderr is discarded: the in-process fallback reports
any real error the normal way.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from lens.plotprep import Prepare
from lens.plots import PlotJob

MAX_WORKERS = 4
NICENESS = 19
"""Workers run at the lowest priority: their import must not slow the model load."""
CLOSE_GRACE = 0.2
"""Seconds a worker gets to exit once its input is closed (an idle one takes milliseconds)."""
_LENGTH = struct.Struct("<Q")


def _send(stream: IO[bytes], obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def _read(stream: IO[bytes], size: int) -> bytes:
    """``size`` bytes, or fewer at end of input (a raw pipe returns what it has)."""
    parts, got = [], 0
    while got < size and (part := stream.read(size - got)):
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _receive(stream: IO[bytes]) -> Any:
    head = _read(stream, _LENGTH.size)
    if len(head) < _LENGTH.size:
        raise EOFError("the other end closed the pipe")
    (size,) = _LENGTH.unpack(head)
    data = _read(stream, size)
    if len(data) < size:
        raise EOFError("the message was cut short")
    return pickle.loads(data)  # noqa: S301 - our own child process, over a private pipe


def _waiting(stream: IO[bytes]) -> bool:
    """Whether input is waiting on ``stream`` (unbuffered), or it cannot tell."""
    try:
        return bool(select.select([stream], [], [], 0)[0])
    except (OSError, ValueError):  # no select on this kind of stream
        return True


class PlotPool:
    """Up to ``workers`` plot processes, started now; figures go to them with ``submit``
    and come back with ``draw``; ``close`` (or the end of a ``with`` block) ends them."""

    def __init__(self, workers: int) -> None:
        root = str(Path(__file__).resolve().parents[1])  # this very lens in the workers
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self._procs: list[subprocess.Popen[bytes]] = []
        self._kinds = roles(max(0, workers))
        for kinds in self._kinds:
            try:
                self._procs.append(subprocess.Popen(
                    [sys.executable, "-m", "lens.plotpool", *kinds], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env))
            except OSError:
                break  # fewer workers (or none): the rest is drawn in process
            with contextlib.suppress(OSError, AttributeError):  # from its first instruction on
                os.setpriority(os.PRIO_PROCESS, self._procs[-1].pid, NICENESS)
        self._kinds = self._kinds[:len(self._procs)]
        self._writing = [threading.Lock() for _ in self._procs]
        """One per worker: a message goes down its pipe whole."""
        self._done = threading.Condition()
        self._drawn: dict[str, bytes] = {}
        self._owed: set[str] = set()
        """Files submitted and not yet back (bytes, or a worker's end)."""
        self._alive = len(self._procs)
        self._order = itertools.count()
        self._queue: list[tuple[int, int, PlotJob]] = []
        """(priority, submission order, job) not taken yet: every worker takes one when free."""
        self._closing = False
        self._threads: list[threading.Thread] = []
        for i, proc in enumerate(self._procs):
            self._threads.append(threading.Thread(
                target=self._feed, args=(i, proc), daemon=True, name=f"lens-plot-{i}"))
            self._threads[-1].start()

    def __enter__(self) -> PlotPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def size(self) -> int:
        return len(self._procs)

    def _take(self, kinds: tuple[str, ...]) -> PlotJob | None:
        """The next job for a worker that prepared for ``kinds``, once there is one (None
        when the pool closes): the first by priority, then a job of its kinds, then
        submission order."""
        with self._done:
            self._done.wait_for(lambda: self._queue or self._closing)
            if self._closing:
                return None
            entry = min(self._queue, key=lambda e: (e[0], e[2].kind not in kinds, e[1]))
            self._queue.remove(entry)
            return entry[2]

    def _feed(self, i: int, proc: subprocess.Popen[bytes]) -> None:
        """Worker ``i``'s thread: the next job to the worker, its answer into ``_drawn``.

        A worker that fails takes no more jobs; when the last one has failed,
        what is still queued is owed by nobody: ``draw`` draws it in process.
        """
        while (job := self._take(self._kinds[i])) is not None:
            try:
                with self._writing[i]:
                    _send(proc.stdin, [job])  # type: ignore[arg-type]
                answer = _receive(proc.stdout)  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001 - a dead worker, a closed pipe, a bad pickle
                answer = None
            with self._done:
                if answer is not None and job.file in answer:
                    self._drawn[job.file] = answer[job.file]
                self._owed.discard(job.file)
                if answer is None:
                    self._alive -= 1
                    if not self._alive:
                        self._owed.clear()  # the queue's jobs: drawn in process
                self._done.notify_all()
            if answer is None:
                return

    def prepare(self, message: Prepare) -> None:
        """Tell every worker what it can make ready for its kinds of figure before they
        come (``lens.plotprep``). It does so whenever it has nothing to draw; no answer
        comes back, and a worker that is gone is skipped."""
        for proc, writing in zip(self._procs, self._writing, strict=True):
            with writing, contextlib.suppress(OSError, ValueError):
                _send(proc.stdin, message)  # type: ignore[arg-type]

    def submit(self, jobs: Sequence[PlotJob], *, first: bool = False) -> None:
        """Start drawing ``jobs`` now; ``draw`` collects them. Each worker takes the next
        job when it is free: ``first`` jobs before the others, then one of the kind it
        prepared for (``roles``), then in submission order.

        Without workers this does nothing: ``draw`` draws them in process.
        """
        with self._done:
            if not self._alive:
                return
            for job in jobs:
                if job.file in self._owed or job.file in self._drawn:
                    continue
                self._owed.add(job.file)
                self._queue.append((0 if first else 1, next(self._order), job))
            self._done.notify_all()

    def draw(self, jobs: Sequence[PlotJob]) -> dict[str, bytes]:
        """Every job's PNG, keyed by its file name, in the order of ``jobs``.

        Jobs not yet submitted are submitted now; whatever a worker does not
        return is drawn in this process.
        """
        self.submit(jobs)
        with self._done:
            self._done.wait_for(lambda: not any(job.file in self._owed for job in jobs))
            drawn = {job.file: self._drawn.pop(job.file) for job in jobs if job.file in self._drawn}
        return {job.file: drawn[job.file] if job.file in drawn else job.draw() for job in jobs}

    def close(self) -> None:
        """End every worker: close its input (it exits), kill it if it has not within
        ``CLOSE_GRACE`` (still importing, or preparing what no figure will use)."""
        with self._done:
            self._closing = True  # no worker takes another job
            self._done.notify_all()
        for proc in self._procs:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # type: ignore[union-attr]
        for proc in self._procs:
            try:
                proc.wait(timeout=CLOSE_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            with contextlib.suppress(OSError):
                proc.stdout.close()  # type: ignore[union-attr]
        for thread in self._threads:
            thread.join(timeout=2)
        self._procs, self._threads = [], []


def roles(workers: int) -> list[tuple[str, ...]]:
    """The kinds of figure each of ``workers`` workers prepares for, and takes first.

    One worker prepares for both. Of more, the first prepares the trajectories
    (the longest figure) and the others the heatmaps: a one-fact run's two
    figures then each find a worker ready for it, and no worker spends the
    load preparing a frame that another worker will use.
    """
    if workers == 1:
        return [("trajectories", "heatmap")]
    return [("trajectories",), *[("heatmap",)] * (workers - 1)][:workers]


def workers_for(n_jobs: int) -> int:
    """Workers worth starting for ``n_jobs`` figures: one per core, at most ``MAX_WORKERS``."""
    return max(0, min(n_jobs, cores(), MAX_WORKERS))


def cores() -> int:
    """The cores this process may run on (its affinity: a container's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def draw_beside_decode(device_type: str, decode_threads: int) -> bool:
    """Whether a fact's heatmap is best drawn as soon as its passes are done, while the
    other facts decode: only where the decode leaves a core idle.

    That is a GPU decode, or a CPU one on fewer threads (``decode_threads``,
    torch's) than there are cores. Where every core decodes (torch's default
    on a CPU), a worker even at the lowest priority takes a core the decode's
    threads then wait for at each parallel step, and saves the write stage
    less than it costs the passes. ``capitals`` on 2 cores, 13 pairs: drawing
    at write time was the faster in 8; in the last 6 (ABBA order) the median
    analysis and write took 19.2 s against 20.1 s with early heatmaps (a
    noisy machine: 16.2-22.8 s for either).
    """
    return device_type != "cpu" or cores() > decode_threads


def serve(stdin: IO[bytes], stdout: IO[bytes], kinds: Sequence[str]) -> None:
    """A worker's loop: draw each job list that comes in, until end of input.

    It runs at a lower priority (``NICENESS``, set by the pool as it starts):
    its start-up import and what it prepares should take only the cores the
    model load leaves idle; when it draws, the run is waiting for it anyway.
    Whenever no message waits on ``stdin`` (unbuffered, so that the check sees
    everything sent), it takes the next step of ``lens.plotprep`` for its
    ``kinds`` of figure: a figure that comes meanwhile waits for at most one
    step, most often one that it would have taken itself.
    """
    from lens.plotkit import warm_up
    from lens.plotprep import first_steps

    warm_up()
    todo = first_steps(kinds)
    while True:
        if todo and not _waiting(stdin):
            with contextlib.suppress(Exception):  # nothing prepared: the figure draws anew
                todo.pop(0)()
            continue
        try:
            message = _receive(stdin)
        except EOFError:
            return
        if isinstance(message, Prepare):
            todo.extend(message.steps(kinds))
        else:
            _send(stdout, {job.file: job.draw() for job in message})


if __name__ == "__main__":
    # Ctrl-C reaches the whole process group: the run reports it, not its plot workers
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        serve(sys.stdin.buffer.raw, sys.stdout.buffer, sys.argv[1:])  # type: ignore[attr-defined]
    os._exit(0)  # everything is sent: no interpreter teardown for the run to wait on
