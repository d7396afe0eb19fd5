"""One model's run: load, analyse, and write its outputs all at once, or a failure record.

``run_one`` runs in the ``lens.run`` process for a single model; in a sweep each
model runs in its own process, ``python -m lens.worker JOB``, where ``JOB`` is the
JSON the launcher (``lens.sweep``) wrote: the model, the exact ``RunConfig``, the
run directory's file descriptor and the pipe that takes the result back.

All-or-nothing: the files are written into a private staging directory inside
the run directory and moved in at the end, ``output-<name>.json`` last and never
over an existing file. On failure only ``output-<name>.error.json`` is left
(``model, stage, error_class, message``; plus ``traceback`` for bugs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from lens.config import Probe, RunConfig
from lens.errors import LensError
from lens.progress import Progress
from lens.rundir import RunDir
from lens.timing import StageTimer
from lens.writers import json_bytes

STATUSES = ("ok", "failed", "skipped", "interrupted", "not_run", "pending")
STAGES = ("resolve", "device", "load", "analyse", "write", "crash", "interrupted")
_STAGE_WORDS = {"resolve": "finding the model", "device": "choosing a device", "load": "loading",
                "analyse": "analysing", "write": "writing outputs"}


def output_file_names(name: str) -> tuple[str, ...]:
    """Every file a successful run of model ``name`` may write, ``output-<name>.json`` last."""
    return (f"output-{name}-records.csv", f"output-{name}-pure-next-token.csv",
            f"output-{name}-records-prism.csv", f"output-{name}-pure-next-token-prism.csv",
            f"output-{name}-records-tuned.csv", f"output-{name}-pure-next-token-tuned.csv",
            f"output-{name}-residuals.pt", f"output-{name}-aggregate.json",
            f"output-{name}-heatmap.png", f"output-{name}-trajectories.png",
            timings_file(name), f"evaluation-{name}.md", f"output-{name}.json")


def timings_file(name: str) -> str:
    """Seconds per stage: a file of their own, outside the byte-reproducible outputs."""
    return f"output-{name}-timings.json"


def error_file_name(name: str) -> str:
    return f"output-{name}.error.json"


# ---------------------------------------------------------------- results


@dataclass(frozen=True, kw_only=True)
class ModelResult:
    """What one model's run came to; a summary row and, unless ok, a failure record."""

    model: str
    status: str
    """ok, failed, skipped (fits no device), interrupted, not_run, pending."""
    stage: str | None = None
    """Where it failed: resolve, device, load, analyse, write, crash, interrupted."""
    error_class: str | None = None
    message: str | None = None
    traceback: str | None = None
    """For failures that are bugs rather than bad input."""
    summary: Mapping[str, Any] = field(default_factory=dict)
    seconds: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "summary": dict(self.summary)}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ModelResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def error_record(self) -> dict[str, Any]:
        """The content of ``output-<name>.error.json``."""
        record = {"model": self.model, "stage": self.stage, "error_class": self.error_class,
                  "message": self.message}
        if self.traceback:
            record["traceback"] = self.traceback
        return record


def summary_fields(report: Mapping[str, Any]) -> dict[str, Any]:
    """The summary columns of one model, read from its ``output-<name>.json`` report."""
    diag = report["diagnostics"]
    n_layers = report["model_stats"]["num_layers"]
    l_sem = diag.get("L_semantic")
    consistency = diag.get("last_layer_consistency") or {}
    raw = (diag.get("raw_lens_check") or {}).get("summary") or {}
    return {
        "n_layers": n_layers,
        "L_copy": diag.get("L_copy"),
        "L_copy_H": diag.get("L_copy_H"),
        "L_semantic": l_sem,
        "L_semantic_frac": None if l_sem is None or not n_layers else l_sem / n_layers,
        "first_kl_below_1.0": diag.get("first_kl_below_1.0"),
        "first_rank_le_1": diag.get("first_rank_le_1"),
        "last_layer_kl_bits": consistency.get("kl_to_final_bits"),
        "lens_artifact_risk": raw.get("lens_artifact_risk"),
        "delta_L_sem": (report.get("ablation_summary") or {}).get("delta_L_sem"),
        "max_control_margin": (report.get("control_summary") or {}).get("max_control_margin"),
    }


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# ---------------------------------------------------------------- one model


def evaluation_stub(name: str, report: Mapping[str, Any]) -> bytes:
    """``evaluation-<name>.md``: the headline numbers and room for the researcher's reading."""
    d = report["diagnostics"]
    top = report["final_prediction"]["topk"][0]
    lines = [
        f"# Evaluation: {name}", "",
        f"- model: `{d['model']}` ({report['model_stats']['num_layers']} layers, {d['dtype']})",
        f"- final top-1: {top[0]!r} (p = {top[1]:.3f})",
        f"- L_copy = {d['L_copy']}, L_semantic = {d['L_semantic']}, "
        f"lens artifact risk = {d['raw_lens_check']['summary']['lens_artifact_risk']}",
    ]
    if "probe" in report:
        lines.append(f"- probe `{report['probe']['name']}`: {report['probe']['n_facts']} facts "
                     f"(numbers above: the first, `{report['probe']['fact_ids'][0]}`); statistics "
                     f"across facts in `output-{name}-aggregate.json`")
    lines += ["", "## Reading", "", "_Write your interpretation of the per-layer records here._", ""]
    return "\n".join(lines).encode("utf-8")


def warn_non_finite(name: str, report: Mapping[str, Any]) -> None:
    """One stderr line per fact whose run produced NaN/Inf (never silent, even with --quiet)."""
    reports = report.get("facts") or {None: report}
    for fact_id, fact_report in reports.items():
        flag = fact_report["diagnostics"].get("non_finite")
        if flag:
            where = f" fact {fact_id}," if fact_id is not None else ""
            print(f"lens: warning: {name}:{where} non-finite values from layer "
                  f"{flag['first_layer']} of {flag['first_pass']} on; affected metrics are null "
                  "(diagnostics.non_finite)", file=sys.stderr, flush=True)


class FactProgress:
    """``lens: NAME: fact 3/24 (italy)`` on one rewritten stderr line."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, done: int, total: int, fact_id: str) -> None:
        end = "\n" if done == total else ""
        print(f"\r\x1b[2Klens: {self.name}: fact {done}/{total} ({fact_id})", end=end,
              file=sys.stderr, flush=True)


def _summary_line(run: Any) -> str:
    if run.aggregate is None:
        d = run.report["diagnostics"]
        return f"L_copy={d['L_copy']} L_semantic={d['L_semantic']}"

    def median(metric: str) -> str:
        stat = run.aggregate["metrics"][metric]["orig"]
        return "None" if stat["median"] is None else f"{stat['median']:g} ({stat['n']} facts)"

    return (f"{run.aggregate['n_facts']} facts, median L_copy={median('L_copy')} "
            f"L_semantic={median('L_semantic')}")


class OutputExists(LensError):
    """The run directory already holds this model's files: refused, and no failure record
    is added next to them (they belong to an earlier run)."""


def _exists(out: RunDir, name: str) -> str:
    return (f"{out.path / name} exists from an earlier run; lens never overwrites a run: "
            "choose a new --out_dir or omit it to rotate run-latest/")


def _commit(out: RunDir, files: Mapping[str, bytes], staging_name: str) -> None:
    """Write ``files`` into a staging directory, then move them into ``out`` (JSON last)."""
    order = sorted(files, key=lambda n: n.endswith(".json") and n.startswith("output-"))
    try:
        staging = out.subdir(staging_name)
        try:
            for name in order:
                staging.write(name, files[name])
            out.commit(staging, order)
        finally:
            staging.close()
            out.remove_tree(staging_name)
    except FileExistsError as exc:
        raise OutputExists(_exists(out, str(exc.filename or exc))) from exc
    except OSError as exc:
        raise LensError(f"cannot write outputs into {out.path}: {exc.strerror or exc}; "
                        "free space or choose another --out_dir") from exc


def write_error_record(out: RunDir, name: str, result: ModelResult) -> None:
    """Write ``output-<name>.error.json`` unless one exists already (never replaced)."""
    with contextlib.suppress(FileExistsError, OSError):
        out.create(error_file_name(name), json_bytes(result.error_record()))


def run_one(model_id: str, config: RunConfig, out: RunDir, probe: Probe, *, quiet: bool,
            plots: bool = True, progress: Progress | None = None, staging_name: str | None = None,
            free: Callable[[str], float | None] | None = None) -> ModelResult:
    """Load, analyse and write one model into ``out``; never raises for the model's failures.

    On failure (including Ctrl-C) nothing named ``output-<name>`` is left in
    ``out`` except the failure record ``output-<name>.error.json``.
    """
    from lens.devices import DeviceError, free_memory
    from lens.model import load_model, output_name
    from lens.prism import precheck
    from lens.tuned import precheck as tuned_precheck
    from lens.report import analyse, output_files

    name = output_name(model_id)
    progress = progress or Progress(quiet=True)
    staging_name = staging_name or f".lens-staging-{name}-{uuid.uuid4().hex[:12]}"
    stage = "write"

    def at(new_stage: str) -> None:
        nonlocal stage
        stage = new_stage
        progress.show(_STAGE_WORDS.get(new_stage, new_stage))

    start = time.perf_counter()
    timer = StageTimer()
    try:
        clash = next((n for n in (*output_file_names(name), error_file_name(name))
                      if out.exists(n)), None)
        if clash:
            raise OutputExists(_exists(out, clash))
        at("resolve")
        precheck(config, name)
        tuned_precheck(config, name)
        timer.start("load")
        model = load_model(model_id, device=config.device, dtype=config.dtype,
                           device_map=config.device_map_value(), n_devices=config.n_devices,
                           free=free or free_memory, on_stage=at)
        timer.stop("load")
        at("analyse")
        show_facts = probe.is_multi and not quiet and sys.stderr.isatty()
        run = analyse(model, probe, config, progress=progress.layer,
                      fact_progress=FactProgress(name) if show_facts else None, timer=timer)
        warn_non_finite(name, run.report)
        timer.start("write")
        files = output_files(run, config)
        files[f"evaluation-{name}.md"] = evaluation_stub(name, run.report)
        if plots:
            from lens.plots import plot_files

            files.update(plot_files(run))
        timer.stop("write")
        files[timings_file(name)] = json_bytes(timer.as_dict())
        at("write")
        _commit(out, files, staging_name)
        result = ModelResult(model=model_id, status="ok", summary=summary_fields(run.report))
    except KeyboardInterrupt:
        result = ModelResult(model=model_id, status="interrupted", stage="interrupted",
                             error_class="KeyboardInterrupt", message=f"interrupted during {stage}")
    except DeviceError as exc:
        result = ModelResult(model=model_id, status="skipped", stage="device",
                             error_class=type(exc).__name__, message=str(exc))
    except LensError as exc:
        result = ModelResult(model=model_id, status="failed", stage=stage,
                             error_class=type(exc).__name__, message=str(exc))
    except Exception as exc:  # noqa: BLE001 - a failing model must not end the sweep
        result = ModelResult(
            model=model_id, status="failed", stage=stage, error_class=type(exc).__name__,
            message=f"{_first_line(exc)} (a bug or a resource limit; traceback in "
                    f"{error_file_name(name)})",
            traceback="".join(traceback.format_exception(exc)))
    finally:
        progress.clear()
    if not result.ok and result.error_class != OutputExists.__name__:
        write_error_record(out, name, result)
    elif not quiet:
        top = run.report["final_prediction"]["topk"][0]
        print(f"lens: {name}: {model.n_layers} layers, final top-1 {top[0]!r} p={top[1]:.3f}, "
              f"{_summary_line(run)} ({time.perf_counter() - start:.1f}s) -> {out.path}",
              flush=True)
        print(f"lens: {name}: seconds: {timer.summary()}", file=sys.stderr, flush=True)
    return result


# ---------------------------------------------------------------- the worker process


def config_to_json(config: RunConfig) -> dict[str, Any]:
    return {f.name: (str(v) if isinstance(v := getattr(config, f.name), Path) else v)
            for f in dataclasses.fields(config)}


def config_from_json(raw: Mapping[str, Any]) -> RunConfig:
    values = dict(raw)
    for key in ("prism_dir", "tuned_dir"):
        if values.get(key) is not None:
            values[key] = Path(values[key])
    return RunConfig(**values)


def worker_main(job: Mapping[str, Any]) -> int:
    """Run one model of a sweep (``python -m lens.worker JOB``) and send back its result."""
    from lens.probe import resolve_probe

    result_fd = int(job["result_fd"])
    logging.getLogger("lens").setLevel(logging.ERROR if job["quiet"] else logging.WARNING)
    out = RunDir(int(job["out_fd"]), Path(job["out_path"]))
    progress = Progress(quiet=bool(job["quiet"]),
                        prefix=f"[{job['index']}/{job['total']}] {job['model']}")
    try:
        probe = resolve_probe(job.get("probe", "default"))
    except LensError as exc:
        print(f"lens: error: {exc}", file=sys.stderr)
        return 1
    result = run_one(job["model"], config_from_json(job["config"]), out, probe,
                     quiet=bool(job["quiet"]), plots=bool(job.get("plots", True)),
                     progress=progress, staging_name=job["staging"])
    with os.fdopen(result_fd, "wb") as pipe:
        pipe.write(json.dumps(result.to_json()).encode("utf-8"))
    return 0 if result.ok else (130 if result.status == "interrupted" else 1)


def _interrupt_once(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C raises once; later ones are ignored so that the failure record gets written."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGINT, _interrupt_once)
    try:
        args = list(sys.argv[1:] if argv is None else argv)
        if len(args) != 1:
            print("lens.worker: error: run by python -m lens.run, not by hand", file=sys.stderr)
            return 2
        return worker_main(json.loads(args[0]))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
