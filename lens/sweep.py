"""Sweeps: the probe over a list of models, each in its own worker process (SPEC §8–§9).

A sweep survives its models: a model that fails (bad id, load error, out of
memory, a crash of its process) gets one line on stderr and a failure record
``output-<name>.error.json`` (``model, stage, error_class, message``) instead of
outputs, and the sweep goes on. ``summary.csv``/``summary.md`` get a row per
model, rewritten after each one, so even a killed sweep leaves a summary.

One model's run, in-process or in a worker, is ``lens.worker``.
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
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lens.config import RunConfig
from lens.errors import LensError
from lens.launch import SweepEvents
from lens.probe import resolve_probe
from lens.progress import SweepStatus
from lens.rundir import RunDir
from lens.worker import (
    STATUSES,
    ModelResult,
    config_to_json,
    error_file_name,
    output_file_names,
    summary_fields,
    write_error_record,
)
from lens.writers import csv_bytes

PRESETS: dict[str, tuple[str, ...]] = {
    "baseline10": (
        "mistralai/Mistral-7B-v0.1",
        "meta-llama/Meta-Llama-3-8B",
        "Qwen/Qwen3-8B",
        "google/gemma-2-9b",
        "Qwen/Qwen3-14B",
        "google/gemma-2-27b",
        "01-ai/Yi-34B",
        "meta-llama/Meta-Llama-3-70B",
        "mistralai/Mistral-Small-24B-Base-2501",
        "Qwen/Qwen2.5-72B",
    ),
}
SUMMARY_COLUMNS = (
    "model", "status", "n_layers", "L_copy", "L_copy_H", "L_semantic", "L_semantic_frac",
    "first_kl_below_1.0", "first_rank_le_1", "last_layer_kl_bits", "lens_artifact_risk",
    "delta_L_sem", "max_control_margin", "seconds",
)
STOP_WAIT = 2.0
"""Seconds a worker gets to finish on its own after Ctrl-C before it is sent SIGINT."""
STOP_GRACE = 30.0
"""Seconds an interrupted worker gets to write its failure record before it is killed."""


# ---------------------------------------------------------------- model lists


def read_models_file(path: Path) -> list[str]:
    """One model id or path a line; blank lines and ``#`` comments are ignored.

    A comment starts at a ``#`` at the start of a line or after whitespace, so
    a path containing ``#`` elsewhere survives.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise LensError(f"cannot read --models-file {path}: {exc.strerror or exc}; "
                        "give a text file with one model id or path a line") from exc
    except UnicodeDecodeError as exc:
        raise LensError(f"--models-file {path} is not UTF-8 text: {exc.reason}") from exc
    models = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            continue
        for i, ch in enumerate(stripped):
            if ch == "#" and stripped[i - 1].isspace():
                stripped = stripped[:i].rstrip()
                break
        if stripped:
            models.append(stripped)
    if not models:
        raise LensError(f"--models-file {path} lists no models; put one model id or path a line")
    return models


def model_list(models: Sequence[str], *, models_file: Path | None = None,
               preset: str | None = None, default: str) -> tuple[list[str], bool]:
    """The models to run, in order (arguments, then the file, then the preset), and
    whether this is a sweep (more than one model, or a list from a file or preset).

    Raises:
        LensError: Two models would write the same ``output-<name>`` files.
    """
    from lens.model import output_name

    listed = [*models]
    if models_file is not None:
        listed += read_models_file(models_file)
    if preset is not None:
        if preset not in PRESETS:
            raise LensError(f"unknown --preset {preset!r}; choose one of {', '.join(PRESETS)}")
        listed += PRESETS[preset]
    sweep = len(listed) > 1 or models_file is not None or preset is not None
    listed = listed or [default]
    seen: dict[str, str] = {}
    for model in listed:
        name = output_name(model)
        if name in seen:
            raise LensError(f"{seen[name]!r} and {model!r} would both write output-{name}.*; "
                            "list each model once, or run same-named models into separate --out_dir")
        seen[name] = model
    return listed, sweep


def worker_argv(job: Mapping[str, Any]) -> list[str]:
    """The command line that runs one model of a sweep in a fresh interpreter."""
    return [sys.executable, "-m", "lens.worker", json.dumps(job)]


def _worker_env() -> dict[str, str]:
    """The environment, with this very ``lens`` first on the path of the worker."""
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


def _stop(proc: subprocess.Popen[bytes]) -> int:
    """After Ctrl-C: let the worker finish its failure record, then insist."""
    try:
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
             interrupted: bool) -> ModelResult:
    """A worker that gave no result: keep complete outputs, remove partial ones, record why."""
    present = [n for n in output_file_names(name) if n not in before and out.exists(n)]
    json_name = f"output-{name}.json"
    if json_name in present:  # committed (JSON moves last) but died before reporting back
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return ModelResult(model=model, status="ok",
                               summary=summary_fields(json.loads(out.read(json_name))))
    for n in present:
        out.remove(n)
    if interrupted:
        result = ModelResult(model=model, status="interrupted", stage="interrupted",
                             error_class="KeyboardInterrupt",
                             message=f"interrupted; {_describe_exit(rc)}")
    else:
        result = ModelResult(model=model, status="failed", stage="crash", error_class="WorkerCrash",
                             message=_describe_exit(rc))
    write_error_record(out, name, result)
    return result


def run_in_worker(model: str, config: RunConfig, out: RunDir, *, index: int, total: int,
                  quiet: bool, probe: str = "default", plots: bool = True,
                  argv: Callable[[Mapping[str, Any]], list[str]] = worker_argv,
                  ) -> tuple[ModelResult, bool]:
    """Run one model in its own process; returns its result and whether Ctrl-C was pressed."""
    from lens.model import output_name

    name = output_name(model)
    staging = f".lens-staging-{name}-{uuid.uuid4().hex[:12]}"
    before = {n for n in output_file_names(name) if out.exists(n)}
    read_fd, write_fd = os.pipe()
    job = {"model": model, "config": config_to_json(config), "out_fd": out.fd,
           "out_path": str(out.path), "result_fd": write_fd, "staging": staging,
           "quiet": quiet, "index": index, "total": total, "probe": probe, "plots": plots}
    start = time.monotonic()
    interrupted = False
    try:
        try:
            proc = subprocess.Popen(argv(job), pass_fds=(out.fd, write_fd), env=_worker_env())
        except OSError as exc:
            result = ModelResult(model=model, status="failed", stage="crash",
                                 error_class=type(exc).__name__,
                                 message=f"cannot start its worker process: {exc}")
            write_error_record(out, name, result)
            return result, False
        finally:
            os.close(write_fd)
        try:
            data = _read_all(read_fd)
            rc = proc.wait()
        except KeyboardInterrupt:
            interrupted = True
            rc = _stop(proc)
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
        result = _recover(out, model, name, before, rc, interrupted)
    return dataclasses.replace(result, seconds=seconds), interrupted or result.status == "interrupted"


# ---------------------------------------------------------------- the summary


def _md_cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return format(value, ".3g")
    return str(value).replace("|", "\\|").replace("\n", " ")


class Summary:
    """``summary.csv`` and ``summary.md`` of a sweep (``summary-2.*``… if taken).

    The files are claimed when the sweep starts and rewritten after every model.
    """

    def __init__(self, out: RunDir, models: Sequence[str]) -> None:
        self.out = out
        self.models = list(models)
        n = 1
        while True:
            suffix = self.suffix = "" if n == 1 else f"-{n}"
            self.csv_name, self.md_name = f"summary{suffix}.csv", f"summary{suffix}.md"
            try:
                if out.exists(self.md_name):
                    raise FileExistsError(self.md_name)
                out.create(self.csv_name, csv_bytes(SUMMARY_COLUMNS, []))
            except FileExistsError:
                n += 1
                continue
            break
        self.write({})

    def rows(self, results: Mapping[str, ModelResult], missing: str) -> list[list[Any]]:
        rows = []
        for model in self.models:
            r = results.get(model) or ModelResult(model=model, status=missing)
            values = {**dict.fromkeys(SUMMARY_COLUMNS), **r.summary, "model": model,
                      "status": r.status, "seconds": r.seconds}
            rows.append([values[c] for c in SUMMARY_COLUMNS])
        return rows

    def write(self, results: Mapping[str, ModelResult], *, final: bool = False) -> None:
        rows = self.rows(results, "not_run" if final else "pending")
        self.out.write(self.csv_name, csv_bytes(SUMMARY_COLUMNS, rows))
        self.out.write(self.md_name, self.markdown(results, rows))

    def markdown(self, results: Mapping[str, ModelResult], rows: list[list[Any]]) -> bytes:
        counts: dict[str, int] = {}
        for row in rows:
            counts[row[1]] = counts.get(row[1], 0) + 1
        lines = [
            "# Sweep summary", "",
            f"{len(rows)} models: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".", "",
            "Columns: see the README (`L_semantic_frac` = L_semantic / n_layers; "
            "`last_layer_kl_bits` = KL of the lens at the last layer to the model's head).", "",
            "| " + " | ".join(SUMMARY_COLUMNS) + " |",
            "|" + "---|" * len(SUMMARY_COLUMNS),
        ]
        lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]
        from lens.model import output_name

        failures = [r for r in results.values() if not r.ok]
        if failures:
            lines += ["", "## Not completed", ""]
            for r in failures:
                lines.append(f"- `{r.model}`: {r.status} at {r.stage} — {r.error_class}: "
                             f"{_md_cell(r.message)} (`{error_file_name(output_name(r.model))}`)")
        return ("\n".join(lines) + "\n").encode("utf-8")


# ---------------------------------------------------------------- the sweep


def _plot_sweep(out: RunDir, models: Sequence[str], suffix: str = "") -> None:
    """``sweep-trajectories.png``: every finished model on normalised depth (never overwritten;
    ``suffix`` follows the summary's, ``-2`` for a resumed sweep).

    Models whose pure CSV is missing are left out; a plot never fails a sweep.
    """
    from lens.model import output_name
    from lens.plots import plot_sweep, sweep_model_from_dir

    name = f"sweep-trajectories{suffix}.png"
    names = [output_name(m) for m in models]
    names = [n for n in names if out.exists(f"output-{n}-pure-next-token.csv")]
    if not names or out.exists(name):
        return
    try:
        out.create(name, plot_sweep([sweep_model_from_dir(out.path, n) for n in names]))
    except Exception as exc:  # noqa: BLE001 - the summary is written; the picture is extra
        print(f"lens: warning: no {name}: {type(exc).__name__}: {exc}", file=sys.stderr)


def run_locally(models: Sequence[str], config: RunConfig, out: RunDir, events: SweepEvents, *,
                done: int, total: int, quiet: bool, probe: str, plots: bool,
                argv: Callable[[Mapping[str, Any]], list[str]] = worker_argv) -> bool:
    """The local launcher: one worker process per model, one after another.

    Returns whether Ctrl-C ended the sweep.
    """
    for model in models:
        events.started(model)
        result, interrupted = run_in_worker(model, config, out, index=done, total=total,
                                            quiet=quiet, probe=probe, plots=plots, argv=argv)
        done += 1
        events.finished(model, result)
        if interrupted:
            return True
    return False


def run_sweep(models: Sequence[str], config: RunConfig, out: RunDir, *, quiet: bool,
              probe: str = "default", plots: bool = True,
              argv: Callable[[Mapping[str, Any]], list[str]] = worker_argv,
              launcher: str = "local", ray_address: str | None = None, resume: bool = False,
              on_started: Callable[[str, Mapping[str, Any]], None] | None = None) -> int:
    """Run every model (``launcher``: local worker processes or Ray tasks); the exit status.

    0 when every model succeeded, 130 after Ctrl-C (finished models keep their
    outputs; the summary lists the interrupted and the not-run ones), else 1.
    ``resume``: models complete in ``out`` are kept, not run (``lens.resume``).
    ``on_started`` (Ray) is told each model and its task's ``{pid, node}``.
    """
    from lens.resume import describe, resume as resume_in

    if launcher == "ray":
        from lens.launch.ray_launcher import require_ray

        require_ray()
    results: dict[str, ModelResult] = {}
    if resume:
        results, moved = resume_in(out, models)
        if not quiet:
            print(describe(results, moved, len(models)), file=sys.stderr)
    summary = Summary(out, models)
    summary.write(results)
    status = SweepStatus(len(models), done=len(results), quiet=quiet)

    def finished(model: str, result: ModelResult) -> None:
        results[model] = result
        status.finished(model)
        if not result.ok:
            status.clear()
            if result.status == "interrupted":
                print(f"lens: interrupted: {model}: {result.message}", file=sys.stderr)
            else:
                print(f"lens: error: {model}: {result.status} at {result.stage}: {result.message}",
                      file=sys.stderr)
        summary.write(results)

    events = SweepEvents(started=status.started, finished=finished)
    todo = [m for m in models if m not in results]
    try:
        if launcher == "ray":
            from lens.launch.ray_launcher import run_on_ray

            interrupted = run_on_ray(todo, config, out, resolve_probe(probe), plots=plots,
                                     address=ray_address, events=events, on_started=on_started)
        else:
            interrupted = run_locally(todo, config, out, events, done=len(results),
                                      total=len(models), quiet=quiet, probe=probe, plots=plots,
                                      argv=argv)
    except KeyboardInterrupt:  # between two models
        interrupted = True
    status.clear()
    summary.write(results, final=True)
    n_ok = sum(r.ok for r in results.values())
    if plots and n_ok and not interrupted:
        _plot_sweep(out, [m for m in models if m in results and results[m].ok], summary.suffix)
    if not quiet:
        print(f"lens: sweep: {n_ok} of {len(models)} models ok -> {out.path / summary.md_name}")
    if interrupted:
        return 130
    return 0 if n_ok == len(models) else 1
