"""The local launcher: each model of a sweep in a fresh process (memory isolation, SPEC §9).

The parent hands the child (``lens.launch.child``) the run directory's file
descriptor and a pipe; the child runs the model (``lens.runmodel.run_one``)
and writes its ``ModelResult`` into the pipe. A child that dies without a
result (killed, out of memory) is recovered here: complete outputs are kept,
partial ones removed, and a failure record says why.

Ctrl-C reaches the child too (same process group); SIGTERM reaches only the
parent, which passes it on at once. Either way the child writes its
``interrupted`` record before the parent goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lens import outputs
from lens.config import RunConfig
from lens.interrupts import Terminated
from lens.results import STATUSES, ModelResult, interrupted, summary_fields, write_error_record
from lens.rundir import RunDir

STOP_WAIT = 2.0
"""Seconds a child gets to finish on its own after Ctrl-C before it is sent SIGINT."""
STOP_GRACE = 30.0
"""Seconds an interrupted child gets to write its failure record before it is killed."""


def child_argv(job: Mapping[str, Any]) -> list[str]:
    """The command line that runs one model of a sweep in a fresh interpreter."""
    return [sys.executable, "-m", "lens.launch.child", json.dumps(job)]


def _child_env() -> dict[str, str]:
    """The environment, with this very ``lens`` first on the path of the child."""
    import lens

    env = dict(os.environ)
    root = str(Path(lens.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _stop(proc: subprocess.Popen[bytes], exc: KeyboardInterrupt) -> int:
    """After Ctrl-C or SIGTERM: let the child write its failure record, then insist."""
    try:
        if isinstance(exc, Terminated):
            proc.send_signal(signal.SIGTERM)
        else:
            try:
                return proc.wait(timeout=STOP_WAIT)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
        return proc.wait(timeout=STOP_GRACE)
    except (KeyboardInterrupt, subprocess.TimeoutExpired):
        proc.kill()
        return proc.wait()


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            sig = signal.Signals(-rc).name
        except ValueError:
            sig = f"signal {-rc}"
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if sig == "SIGKILL" else ""
        return f"its process was killed by {sig}{hint}"
    return f"its process exited with status {rc} without a result"


def _recover(out: RunDir, model: str, name: str, before: set[str], rc: int,
             stopped_by: KeyboardInterrupt | None, fact_ids: list[str]) -> ModelResult:
    """A child that gave no result: keep complete outputs, remove partial ones, record why."""
    present = [n for n in outputs.run_file_names(name, fact_ids=fact_ids)
               if n not in before and out.exists(n)]
    if outputs.report_file(name) in present:  # committed (JSON moves last), died before reporting
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return ModelResult(model=model, status="ok", summary=summary_fields(
                json.loads(out.read(outputs.report_file(name)))))
    for n in present:
        out.remove(n)
    if stopped_by is not None:
        result = interrupted(model, f"interrupted; {_describe_exit(rc)}", type(stopped_by).__name__)
    else:
        result = ModelResult(model=model, status="failed", stage="crash", error_class="WorkerCrash",
                             message=_describe_exit(rc))
    write_error_record(out, name, result)
    return result


def _fact_ids(probe: str) -> list[str]:
    """The probe's fact ids (their heatmaps are among a run's files)."""
    from lens.errors import LensError
    from lens.probe import resolve_probe

    try:
        return [f.id for f in resolve_probe(probe).facts]
    except LensError:
        return []


def run_local(model: str, config: RunConfig, out: RunDir, *, index: int, total: int,
              quiet: bool, probe: str = "default", plots: bool = True,
              argv: Callable[[Mapping[str, Any]], list[str]] = child_argv,
              ) -> tuple[ModelResult, KeyboardInterrupt | None]:
    """Run one model in its own process; its result, and the Ctrl-C/SIGTERM that stopped it."""
    name = outputs.output_name(model)
    staging = outputs.staging_name(name)
    before = set(out.names())
    read_fd, write_fd = os.pipe()
    job = {"model": model, "config": config.to_json(), "out_fd": out.fd,
           "out_path": str(out.path), "result_fd": write_fd, "staging": staging,
           "quiet": quiet, "index": index, "total": total, "probe": probe, "plots": plots}
    start = time.monotonic()
    stopped_by: KeyboardInterrupt | None = None
    try:
        try:
            proc = subprocess.Popen(argv(job), pass_fds=(out.fd, write_fd), env=_child_env())
        except OSError as exc:
            result = ModelResult(model=model, status="failed", stage="crash",
                                 error_class=type(exc).__name__,
                                 message=f"cannot start its process: {exc}")
            write_error_record(out, name, result)
            return result, None
        finally:
            os.close(write_fd)
        try:
            data = _read_all(read_fd)
            rc = proc.wait()
        except KeyboardInterrupt as exc:
            stopped_by = exc
            rc = _stop(proc, exc)
            data = _read_all(read_fd)
    finally:
        os.close(read_fd)
    seconds = round(time.monotonic() - start, 2)
    try:
        result = ModelResult.from_json(json.loads(data))
        if result.model != model or result.status not in STATUSES:
            raise ValueError(data)
    except (ValueError, TypeError):
        out.remove_tree(staging)
        result = _recover(out, model, name, before, rc, stopped_by, _fact_ids(probe))
    if stopped_by is None and result.status == "interrupted":  # the child got the signal itself
        terminated = result.error_class == Terminated.__name__
        stopped_by = Terminated() if terminated else KeyboardInterrupt()
    return dataclasses.replace(result, seconds=seconds), stopped_by
