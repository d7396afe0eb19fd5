"""Run one model: load it, analyse it, and deliver its files all at once, or a failure record.

Two halves, so that the work and the writing may happen in different places
(in-process, a subprocess, a Ray worker on another machine):

- ``produce`` loads and analyses the model and returns its files as bytes;
  it never touches the run directory and never raises for the model's own
  failures (bad input, out of memory, a bug): those become its ``result``.
- ``deliver`` writes the produced files into the run directory all at once
  (``lens.commit``: staging, then moved in, ``output-<name>.json`` last, never
  over an existing file), or the failure record ``output-<name>.error.json``
  (``model, stage, error_class, message``; plus ``traceback`` for bugs).

``run_one`` is both, for a single model in the ``lens.run`` process.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lens import outputs
from lens.commit import OutputExists, commit_files, exists_message, recover
from lens.config import Probe, RunConfig
from lens.errors import LensError, first_line
from lens.plots import plot_jobs
from lens.progress import Progress
from lens.results import ModelResult, interrupted, summary_fields, write_error_record
from lens.rundir import RunDir
from lens.timing import StageTimer
from lens.writers import json_bytes

_STAGE_WORDS = {"resolve": "finding the model", "device": "choosing a device", "load": "loading",
                "analyse": "analysing", "write": "writing outputs"}


@dataclass(frozen=True)
class Produced:
    """One model's run before it is written: its result and, when ok, its files."""

    name: str
    """``<name>`` of its files (``lens.outputs.output_name``)."""
    result: ModelResult
    files: Mapping[str, bytes] = field(default_factory=dict)
    """File name → bytes; empty unless ``result.ok``."""
    line: str = ""
    """What a successful run tells the user (stdout, unless --quiet), less its destination."""
    seconds: str = ""
    """Seconds per stage, one line (stderr, unless --quiet)."""


def evaluation_stub(name: str, report: Mapping[str, Any]) -> bytes:
    """``evaluation-<name>.md``: the headline numbers and room for the researcher's reading."""
    d = report["diagnostics"]
    top = report["final_prediction"]["topk"][0]
    lines = [
        f"# Evaluation: {name}", "",
        f"- model: `{d['model']}` ({report['model_stats']['num_layers']} layers, {d['dtype']})",
        f"- final top-1: {top[0]!r} (p = {top[1]:.3f})",
        f"- L_copy = {d['L_copy']}, L_semantic = {d['L_semantic']}, "
        f"lens artifact risk = {report['raw_lens_check']['summary']['lens_artifact_risk']}",
    ]
    if "probe" in report:
        lines.append(f"- probe `{report['probe']['name']}`: {report['probe']['n_facts']} facts "
                     f"(numbers above: the first, `{report['probe']['fact_ids'][0]}`); statistics "
                     f"across facts in `{outputs.aggregate_file(name)}`")
    lines += ["", "## Reading", "",
              "_Write your interpretation of the per-layer records here._", ""]
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


def _summary_line(run: Any) -> str:
    if run.aggregate is None:
        d = run.report["diagnostics"]
        return f"L_copy={d['L_copy']} L_semantic={d['L_semantic']}"

    def median(metric: str) -> str:
        stat = run.aggregate["metrics"][metric]["orig"]
        return "None" if stat["median"] is None else f"{stat['median']:g} ({stat['n']} facts)"

    return (f"{run.aggregate['n_facts']} facts, median L_copy={median('L_copy')} "
            f"L_semantic={median('L_semantic')}")


def _failure(model_id: str, name: str, stage: str, exc: BaseException) -> ModelResult:
    """The result of a failure: bad input is one line; anything else is a bug or a limit."""
    from lens.devices import DeviceError

    if isinstance(exc, KeyboardInterrupt):
        return interrupted(model_id, f"interrupted during {stage}", type(exc).__name__)
    if isinstance(exc, DeviceError):
        return ModelResult(model=model_id, status="skipped", stage="device",
                           error_class=type(exc).__name__, message=str(exc))
    if isinstance(exc, LensError):
        return ModelResult(model=model_id, status="failed", stage=stage,
                           error_class=type(exc).__name__, message=str(exc))
    return ModelResult(
        model=model_id, status="failed", stage=stage, error_class=type(exc).__name__,
        message=f"{first_line(exc)} (a bug or a resource limit; traceback in "
                f"{outputs.error_file(name)})",
        traceback="".join(traceback.format_exception(exc)))


def produce(model_id: str, config: RunConfig, probe: Probe, *, quiet: bool, plots: bool = True,
            progress: Progress | None = None,
            free: Callable[[str], float | None] | None = None) -> Produced:
    """Load and analyse one model; its files as bytes, or why it failed (never raises for that).

    Ctrl-C and SIGTERM become an ``interrupted`` result, as every other failure of the
    model does; ``files`` is then empty.
    """
    from lens.gcpause import freeze_loaded, paused_gc, thaw
    from lens.plotpool import PlotPool, draw_beside_decode, workers_for

    name = outputs.output_name(model_id)
    progress = progress or Progress(quiet=True)
    stage = "resolve"

    def at(new_stage: str) -> None:
        nonlocal stage
        stage = new_stage
        progress.show(_STAGE_WORDS.get(new_stage, new_stage))

    start = time.perf_counter()
    timer = StageTimer()
    pool, froze = None, False
    try:
        at("resolve")
        if plots:  # its workers start before this process's heavy imports and the model load
            pool = PlotPool(workers_for(len(probe.facts) + 1))  # (lens.plotpool)
        import torch

        from lens.devices import free_memory
        from lens.lenses.registry import precheck_lenses
        from lens.model import load_model
        from lens.plotprep import prepare_for
        from lens.plots import heatmap_job
        from lens.report import analyse

        precheck_lenses(config, name)

        def prepare_plots(hf_config: Any, tokenizer: Any) -> None:  # beside the weights' load
            n_layers = getattr(hf_config, "num_hidden_layers", None)
            if pool is not None and isinstance(n_layers, int):
                pool.prepare(prepare_for(n_layers, prompt_lengths(tokenizer, probe)))

        timer.start("load")
        with paused_gc():  # frozen before the collector sees the new objects
            model = load_model(model_id, device=config.device, dtype=config.dtype,
                               device_map=config.device_map_value(),
                               n_devices=config.n_devices, free=free or free_memory, on_stage=at,
                               on_config=prepare_plots)
            froze = freeze_loaded()  # the run's collections skip the model
        timer.stop("load")
        at("analyse")
        beside = pool is not None and draw_beside_decode(model.device.type,
                                                         torch.get_num_threads())

        def draw_early(fact: Any, passes: Any) -> None:  # while the other facts decode
            if pool is not None:
                pool.submit([heatmap_job(model, fact.id, passes, multi=probe.is_multi)])

        run = analyse(model, probe, config, progress=progress.layer,
                      fact_progress=progress.fact if probe.is_multi else None,
                      fact_done=draw_early if beside else None, timer=timer)
        warn_non_finite(name, run.report)
        timer.start("write")
        if pool is not None:  # the figures not started yet, while the CSVs serialise:
            jobs = plot_jobs(run)  # the trajectories (the longest) first
            pool.submit(sorted(jobs, key=lambda job: job.kind != "trajectories"), first=True)
        files = outputs.run_files(run, config, evaluation=evaluation_stub(name, run.report),
                                  plots=plots, draw=pool.draw if pool is not None else None)
        timer.stop("write")
        files[outputs.timings_file(name)] = json_bytes(timer.as_dict())
        top = run.report["final_prediction"]["topk"][0]
        return Produced(
            name=name, files=files,
            result=ModelResult(model=model_id, status="ok", summary=summary_fields(run.report)),
            line=(f"lens: {name}: {model.n_layers} layers, final top-1 {top[0]!r} p={top[1]:.3f}, "
                  f"{_summary_line(run)} ({time.perf_counter() - start:.1f}s)"),
            seconds=f"lens: {name}: seconds: {timer.summary()}")
    except (KeyboardInterrupt, Exception) as exc:  # noqa: BLE001 - a model's failure is its result
        return Produced(name=name, result=_failure(model_id, name, stage, exc))
    finally:
        if pool is not None:
            pool.close()
        thaw(froze)
        progress.clear()


HINTED_FACTS = 32
"""Facts whose prompts ``prompt_lengths`` tokenizes: the workers prepare the first few
heatmap shapes only, and the load waits for this."""


def prompt_lengths(tokenizer: Any, probe: Probe) -> list[int]:
    """The token count of the first ``HINTED_FACTS`` facts' prompts (their heatmaps'
    widths), as the forwards will see them; [] where the tokenizer fails (the run then
    says why)."""
    from lens.model import token_ids

    try:
        return [len(token_ids(tokenizer, fact.prompt)) for fact in probe.facts[:HINTED_FACTS]]
    except Exception:  # noqa: BLE001 - only a hint for the plot workers
        return []


def clash(out: RunDir, name: str, probe: Probe | None = None) -> str | None:
    """The first file of a run of ``name`` already in ``out`` (checked before any work)."""
    fact_ids = [f.id for f in probe.facts] if probe is not None else []
    return next((n for n in (*outputs.run_file_names(name, fact_ids=fact_ids),
                             outputs.error_file(name)) if out.exists(n)), None)


def deliver(out: RunDir, produced: Produced, *, staging_name: str | None = None,
            quiet: bool) -> ModelResult:
    """Write a produced run into ``out``: every file at once, or the failure record.

    Never raises for the model's failures; a run refused because its files exist
    from an earlier run adds no record beside them.
    """
    result, name = produced.result, produced.name
    if result.ok:
        try:
            commit_files(out, name, produced.files, staging_name or outputs.staging_name(name))
        except (KeyboardInterrupt, Exception) as exc:  # noqa: BLE001 - becomes the record
            result = _failure(result.model, name, "write", exc)
    if not result.ok:
        if result.error_class != OutputExists.__name__:
            write_error_record(out, name, result)
    elif not quiet:
        print(f"{produced.line} -> {out.path}", flush=True)
        print(produced.seconds, file=sys.stderr, flush=True)
    return result


def run_one(model_id: str, config: RunConfig, out: RunDir, probe: Probe, *, quiet: bool,
            plots: bool = True, progress: Progress | None = None, staging_name: str | None = None,
            free: Callable[[str], float | None] | None = None) -> ModelResult:
    """Load, analyse and write one model into ``out``; never raises for the model's failures.

    First finishes or removes what a killed earlier run of the model left in
    ``out`` (``lens.commit.recover``, one stderr line each), and refuses at once
    when the model's files exist from an earlier run. On failure (including
    Ctrl-C and SIGTERM) nothing named ``output-<name>`` is left in ``out`` except
    the failure record ``output-<name>.error.json``.
    """
    name = outputs.output_name(model_id)
    for note in recover(out, name):
        print(f"lens: {name}: {note}", file=sys.stderr, flush=True)
    existing = clash(out, name, probe)
    if existing is not None:
        message = exists_message(out, existing)
        return ModelResult(model=model_id, status="failed", stage="write",
                           error_class=OutputExists.__name__, message=message)
    produced = produce(model_id, config, probe, quiet=quiet, plots=plots, progress=progress,
                       free=free)
    return deliver(out, produced, staging_name=staging_name, quiet=quiet)

