"""Every output and staging file name of a run, and the bytes of a run's files (docs/outputs.md).

This module is the only one that spells ``output-…``: the writers, the
launchers, the clash check before a run and the recovery after a crashed one
all ask it, so the list of a run's files cannot drift from the files written.

``<name>`` is the model id after its last ``/``; a local path is resolved
first, so ``.`` and ``tiny-gpt2/.`` are named after their directory. Names
always fit the file-name limit (``NAME_MAX``, 255 bytes on Linux and macOS):
a stem longer than ``MAX_STEM`` bytes is cut and gets ``-`` plus the first 10
hex digits of the SHA-256 of the whole stem, so two long names stay distinct.
The full model id is kept inside the files (``diagnostics.model``, ``model``
of the failure record).
"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

MAX_STEM = 120
"""Bytes of a model's ``<name>``; with the longest suffix, a staging directory's
hidden temporary files and a fact id, every name stays far below 255 bytes."""
MAX_FACT = 60
"""Bytes of a fact id inside a per-fact file name."""
PRIMARY_LENS = "norm"
"""Lenses that may write sidecar CSVs; the clash check and crash recovery look for all."""
STAGING_PREFIX = ".lens-staging-"


def fit(text: str, limit: int) -> str:
    """``text`` if it has at most ``limit`` UTF-8 bytes, else its cut form plus a short hash."""
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    digest = hashlib.sha256(raw).hexdigest()[:10]
    head = raw[:limit - len(digest) - 1].decode("utf-8", errors="ignore")
    return f"{head}-{digest}"


def output_name(model_id: str) -> str:
    """``<name>`` of a model's files: the directory's own name for a local path, else the
    id after its last ``/``; cut to ``MAX_STEM`` bytes plus a hash when longer."""
    path = Path(model_id).expanduser()
    if model_id.startswith((".", "/", "~")) or path.exists():
        stem = path.resolve().name or "root"
    else:
        stem = model_id.rstrip("/").rsplit("/", 1)[-1] or "model"
    return fit(stem, MAX_STEM)


# ---------------------------------------------------------------- one file each


def report_file(name: str) -> str:
    """``output-<name>.json``: the report, always moved in last (its presence = complete)."""
    return f"output-{name}.json"


def error_file(name: str) -> str:
    """``output-<name>.error.json``: the failure record of a model that did not finish."""
    return f"output-{name}.error.json"


def records_file(name: str, lens: str = PRIMARY_LENS) -> str:
    """The per-position CSV of ``lens`` (no suffix for the primary norm lens)."""
    return f"output-{name}-records{_lens_suffix(lens)}.csv"


def pure_file(name: str, lens: str = PRIMARY_LENS) -> str:
    """The pure next-token CSV of ``lens`` (no suffix for the primary norm lens)."""
    return f"output-{name}-pure-next-token{_lens_suffix(lens)}.csv"


def aggregate_file(name: str) -> str:
    return f"output-{name}-aggregate.json"


def residuals_file(name: str) -> str:
    return f"output-{name}-residuals.pt"


def heatmap_file(name: str, fact_id: str | None = None) -> str:
    """One heatmap per fact for a probe with several facts, else one."""
    return f"output-{name}-heatmap{'' if fact_id is None else '-' + fit(fact_id, MAX_FACT)}.png"


def trajectories_file(name: str) -> str:
    return f"output-{name}-trajectories.png"


def timings_file(name: str) -> str:
    """Seconds per stage: a file of their own, outside the byte-reproducible outputs."""
    return f"output-{name}-timings.json"


def evaluation_file(name: str) -> str:
    return f"evaluation-{name}.md"


def staging_name(name: str) -> str:
    """A fresh private directory in the run directory where a run's files are written first."""
    return f"{STAGING_PREFIX}{name}-{uuid.uuid4().hex[:12]}"


def is_staging(entry: str, name: str | None = None) -> bool:
    """Whether ``entry`` is a staging directory (of model ``name``, when given)."""
    if not entry.startswith(STAGING_PREFIX):
        return False
    return name is None or entry[len(STAGING_PREFIX):-13] == name


def _lens_suffix(lens: str) -> str:
    return "" if lens == PRIMARY_LENS else f"-{lens}"


def run_file_names(name: str, *, fact_ids: Sequence[str] = (),
                   lenses: Iterable[str] | None = None) -> tuple[str, ...]:
    """Every file a successful run of model ``name`` may write, ``output-<name>.json`` last.

    ``fact_ids`` adds the per-fact heatmaps of a probe with several facts;
    ``lenses`` the sidecar lenses whose CSVs may appear (default: every lens in
    the registry, ``lens.lenses.registry.LENSES``).
    """
    if lenses is None:
        from lens.lenses.registry import LENSES

        lenses = LENSES
    sidecars = [f(name, lens) for lens in lenses for f in (records_file, pure_file)]
    heatmaps = [heatmap_file(name, fid) for fid in fact_ids] if len(fact_ids) > 1 else []
    return (records_file(name), pure_file(name), *sidecars, residuals_file(name),
            aggregate_file(name), heatmap_file(name), *heatmaps, trajectories_file(name),
            timings_file(name), evaluation_file(name), report_file(name))


def commit_order(name: str, files: Iterable[str]) -> list[str]:
    """The order in which a run's files are moved in: ``output-<name>.json`` last, so that
    its presence means the run is complete."""
    return sorted(files, key=lambda n: n == report_file(name))


# ---------------------------------------------------------------- a run's bytes


def run_files(run: Any, config: Any, *, evaluation: bytes | None = None,
              plots: bool = False, draw: Any = None) -> dict[str, bytes]:
    """File name → canonical bytes for one model's run (``lens.report.ModelRun``).

    A probe with more than one fact adds the ``fact_id`` column to the CSVs and
    writes ``output-<name>-aggregate.json``; a one-fact probe writes exactly the
    documented one-fact files. Every sidecar lens that ran (``run.sidecar_lenses``) gets its two
    CSVs. ``plots`` adds the PNGs, drawn by ``draw`` (``lens.plotpool.PlotPool.draw``;
    default: in this process).
    """
    from lens.writers import json_bytes, pure_csv, records_csv

    name, multi = run.model.name, run.probe.is_multi
    files = {report_file(name): json_bytes(run.report)}
    for lens in (PRIMARY_LENS, *run.sidecar_lenses):
        files[records_file(name, lens)] = records_csv(run.records, lens, fact_column=multi)
        files[pure_file(name, lens)] = pure_csv(run.records, lens, fact_column=multi)
    if run.aggregate is not None:
        files[aggregate_file(name)] = json_bytes(run.aggregate)
    if config.keep_residuals:
        import torch

        buffer = io.BytesIO()
        torch.save({("" if not multi else f"{p.ctx.fact_id}/")
                    + f"{p.ctx.prompt_id}/{p.ctx.variant}": p.capture.resids.cpu()
                    for p in run.passes if p.capture is not None}, buffer)
        files[residuals_file(name)] = buffer.getvalue()
    if evaluation is not None:
        files[evaluation_file(name)] = evaluation
    if plots:
        from lens.plots import draw_in_process, plot_jobs

        files.update((draw or draw_in_process)(plot_jobs(run)))
    return files
