"""Sweeps: the probe over a list of models, each in its own process (README, Sweeps).

A sweep survives its models: a model that fails (bad id, load error, out of
memory, a crash of its process) gets one line on stderr and a failure record
``output-<name>.error.json`` (``model, stage, error_class, message``) instead of
outputs, and the sweep goes on. ``summary.csv``/``summary.md`` get a row per
model, rewritten after each one, so even a killed sweep leaves a summary.

One model's run is ``lens.runmodel``; a launcher runs the models: the local one
(``lens.launch.local``) each in its own process, one after another, the Ray one
(``lens.launch.ray_launcher``) each as a Ray task, concurrently. ``--resume``
keeps the models already complete (``lens.resume``). Ctrl-C and SIGTERM stop the
running model (its record says ``interrupted``), finalise the summary and end
the sweep with 130 or 143.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lens import outputs
from lens.config import RunConfig
from lens.errors import LensError
from lens.interrupts import exit_status, handled
from lens.launch import SweepEvents
from lens.launch.local import child_argv, run_local
from lens.probe import resolve_probe
from lens.progress import SweepStatus
from lens.results import ModelResult
from lens.rundir import RunDir
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
        name = outputs.output_name(model)
        if name in seen:
            raise LensError(f"{seen[name]!r} and {model!r} would both write "
                            f"{outputs.report_file(name)} and its other files; "
                            "list each model once, or run same-named models into separate "
                            "--out_dir")
        seen[name] = model
    return listed, sweep


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
    A summary that cannot be written (full disk, the directory gone) never stops
    the sweep: the failure is kept in ``error``, the next write tries again, and
    the per-model records stand on their own.
    """

    def __init__(self, out: RunDir, models: Sequence[str]) -> None:
        self.out = out
        self.models = list(models)
        self.error: str | None = None
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
            except OSError as exc:
                self.error = exc.strerror or str(exc)
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

    def write(self, results: Mapping[str, ModelResult], *, final: bool = False) -> bool:
        """Rewrite both files; False (and ``error`` set) when they cannot be written."""
        rows = self.rows(results, "not_run" if final else "pending")
        try:
            self.out.write(self.csv_name, csv_bytes(SUMMARY_COLUMNS, rows))
            self.out.write(self.md_name, self.markdown(results, rows))
        except OSError as exc:
            self.error = exc.strerror or str(exc)
            return False
        self.error = None
        return True

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
        failures = [r for r in results.values() if not r.ok]
        if failures:
            lines += ["", "## Not completed", ""]
            for r in failures:
                record = outputs.error_file(outputs.output_name(r.model))
                lines.append(f"- `{r.model}`: {r.status} at {r.stage} — {r.error_class}: "
                             f"{_md_cell(r.message)} (`{record}`)")
        return ("\n".join(lines) + "\n").encode("utf-8")


# ---------------------------------------------------------------- the sweep


def _plot_sweep(out: RunDir, models: Sequence[str], suffix: str = "") -> None:
    """``sweep-trajectories.png``: every finished model on normalised depth (never overwritten;
    ``suffix`` follows the summary's: ``-2`` for a resumed sweep's).

    Models whose pure CSV is missing are left out; a plot never fails a sweep.
    """
    from lens.plots import plot_sweep, sweep_model_from_dir

    name = f"sweep-trajectories{suffix}.png"
    names = [outputs.output_name(m) for m in models]
    names = [n for n in names if out.exists(outputs.pure_file(n))]
    if not names or out.exists(name):
        return
    try:
        out.create(name, plot_sweep([sweep_model_from_dir(out.path, n) for n in names]))
    except Exception as exc:  # noqa: BLE001 - the summary is written; the picture is extra
        print(f"lens: warning: no {name}: {type(exc).__name__}: {exc}", file=sys.stderr)


def run_locally(models: Sequence[str], config: RunConfig, out: RunDir, events: SweepEvents, *,
                done: int, total: int, quiet: bool, probe: str, plots: bool,
                argv: Callable[[Mapping[str, Any]], list[str]] = child_argv,
                ) -> KeyboardInterrupt | None:
    """The local launcher: one process per model, one after another; the Ctrl-C/SIGTERM
    that stopped the sweep, if any."""
    for model in models:
        events.started(model)
        result, stopped_by = run_local(model, config, out, index=done, total=total, quiet=quiet,
                                       probe=probe, plots=plots, argv=argv)
        done += 1
        events.finished(model, result)
        if stopped_by is not None:
            return stopped_by
    return None


def run_sweep(models: Sequence[str], config: RunConfig, out: RunDir, *, quiet: bool,
              probe: str = "default", plots: bool = True,
              argv: Callable[[Mapping[str, Any]], list[str]] = child_argv,
              launcher: str = "local", ray_address: str | None = None, resume: bool = False,
              on_started: Callable[[str, Mapping[str, Any]], None] | None = None) -> int:
    """Run every model (``launcher``: local processes or Ray tasks); returns the exit status.

    0 when every model succeeded; 130 after Ctrl-C, 143 after SIGTERM (finished
    models keep their outputs; the summary lists the interrupted and the not-run
    ones); else 1, also when the summary could not be written. ``resume``: models
    complete in ``out`` are kept, not run (``lens.resume``). ``on_started`` (Ray)
    is told each model and its task's ``{pid, node}``.
    """
    from lens.resume import describe, resume as resume_in

    if launcher == "ray":
        from lens.launch.ray_launcher import require_ray

        require_ray()
    with handled():
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
                    print(f"lens: error: {model}: {result.status} at {result.stage}: "
                          f"{result.message}", file=sys.stderr)
            summary.write(results)

        events = SweepEvents(started=status.started, finished=finished)
        todo = [m for m in models if m not in results]
        try:
            if launcher == "ray":
                from lens.launch.ray_launcher import run_on_ray

                stopped_by = run_on_ray(todo, config, out, resolve_probe(probe), plots=plots,
                                        quiet=quiet, address=ray_address, events=events,
                                        on_started=on_started)
            else:
                stopped_by = run_locally(todo, config, out, events, done=len(results),
                                         total=len(models), quiet=quiet, probe=probe,
                                         plots=plots, argv=argv)
        except KeyboardInterrupt as exc:  # between two models
            stopped_by = exc
        status.clear()
        return _finish(summary, results, out, models, quiet=quiet, plots=plots,
                       stopped_by=stopped_by)


def _finish(summary: Summary, results: Mapping[str, ModelResult], out: RunDir,
            models: Sequence[str], *, quiet: bool, plots: bool,
            stopped_by: KeyboardInterrupt | None) -> int:
    """The final summary (one retry's worth of line when it cannot be written), plot, status."""
    if not summary.write(results, final=True):
        print(f"lens: error: cannot write {out.path / summary.csv_name}: {summary.error}; the "
              "per-model outputs and failure records are complete: free space and re-run into "
              "a new --out_dir for a summary", file=sys.stderr)
    n_ok = sum(r.ok for r in results.values())
    if plots and n_ok and stopped_by is None:
        _plot_sweep(out, [m for m in models if m in results and results[m].ok], summary.suffix)
    if not quiet and summary.error is None:
        print(f"lens: sweep: {n_ok} of {len(models)} models ok -> {out.path / summary.md_name}")
    if stopped_by is not None:
        return exit_status(stopped_by)
    return 0 if n_ok == len(models) and summary.error is None else 1
