"""``--resume DIR``: finish a sweep in its own directory, re-running only what is missing.

A model counts as done when its outputs in DIR are complete, checked rather
than assumed: ``output-<name>.json`` parses, names this very model
(``diagnostics.model``) and has its layer count; the per-position and pure
next-token CSVs (and any sidecar CSVs) parse, every row has the header's width,
and every pass (and position) has exactly one row per layer ``0 … n_layers``.

Every other model runs again. Lens never overwrites or deletes a result, so
what a model left behind — its old failure record, or outputs that failed the
check — is first moved, under its own name, into ``superseded/<n>/`` (``n`` the
first free number; one folder per resume).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from lens import outputs
from lens.commit import recover
from lens.errors import LensError
from lens.results import ModelResult, summary_fields
from lens.rundir import RunDir, _move_no_replace
from lens.writers import read_csv_rows

SUPERSEDED = "superseded"
_KEY_COLUMNS = ("fact_id", "prompt_id", "prompt_variant", "pos")


def csv_complete(data: bytes, n_layers: int) -> bool:
    """Whether a per-layer CSV holds whole passes: full rows, one per layer of each pass/position."""
    if not data.endswith(b"\n"):
        return False
    try:
        header, *rows = read_csv_rows(data)
    except (UnicodeDecodeError, ValueError):
        return False
    if "layer" not in header or not rows:
        return False
    keys = [header.index(c) for c in _KEY_COLUMNS if c in header]
    at = header.index("layer")
    layers: dict[tuple[str, ...], list[str]] = {}
    for row in rows:
        if len(row) != len(header):
            return False
        layers.setdefault(tuple(row[k] for k in keys), []).append(row[at])
    wanted = list(range(n_layers + 1))
    return all(all(v.isdigit() for v in found) and sorted(map(int, found)) == wanted
               for found in layers.values())


def complete_result(out: RunDir, model: str) -> ModelResult | None:
    """The ``ok`` result of a model whose outputs in ``out`` are complete, else None."""
    name = outputs.output_name(model)
    try:
        report = json.loads(out.read(outputs.report_file(name)))
        if report["diagnostics"]["model"] != model:
            return None
        n_layers = int(report["model_stats"]["num_layers"])
        summary = summary_fields(report)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (out.exists(outputs.records_file(name)) and out.exists(outputs.pure_file(name))):
        return None
    for csv_name in outputs.run_file_names(name):
        if not csv_name.endswith(".csv"):
            continue
        if out.exists(csv_name) and not csv_complete(out.read(csv_name), n_layers):
            return None
    return ModelResult(model=model, status="ok", summary=summary, seconds=_seconds(out, name))


def _seconds(out: RunDir, name: str) -> float | None:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return float(json.loads(out.read(outputs.timings_file(name)))["total"])
    return None


def _fact_ids(out: RunDir, name: str) -> list[str]:
    """The facts of a multi-fact run whose report is there (they name its heatmaps)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return list(json.loads(out.read(outputs.report_file(name)))["probe"]["fact_ids"])
    return []


def _superseded_folder(out: RunDir) -> RunDir:
    """A new, empty ``superseded/<n>/`` (the first free ``n``)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(SUPERSEDED, dir_fd=out.fd)
    with RunDir.open(out.path / SUPERSEDED, dir_fd=out.fd) as parent:
        n = 1
        while True:
            try:
                return parent.subdir(str(n))
            except FileExistsError:
                n += 1


def set_aside(out: RunDir, models: Sequence[str]) -> list[str]:
    """Move what ``models`` left in ``out`` into ``superseded/<n>/``; returns the names moved."""
    moved: list[str] = []
    folder: RunDir | None = None
    try:
        for model in models:
            name = outputs.output_name(model)
            files = (*outputs.run_file_names(name, fact_ids=_fact_ids(out, name)),
                     outputs.error_file(name))
            for file in files:
                if not out.exists(file):
                    continue
                folder = folder or _superseded_folder(out)
                _move_no_replace(out.fd, file, folder.fd, file)
                moved.append(f"{SUPERSEDED}/{os.path.basename(str(folder.path))}/{file}")
    except OSError as exc:
        raise LensError(f"cannot move earlier files aside in {out.path}: {exc.strerror or exc}; "
                        "check the directory's permissions") from exc
    finally:
        if folder is not None:
            folder.close()
    return moved


def models_of(out: RunDir) -> list[str]:
    """The models of the sweep in ``out``, from its latest ``summary*.csv``."""
    summaries = [n for n in out.names() if n.startswith("summary") and n.endswith(".csv")]
    if not summaries:
        raise LensError(f"--resume {out.path}: no summary.csv there to take the models from; "
                        "name the models again (or --models-file / --preset)")
    latest = max(summaries, key=_summary_number)
    header, *rows = read_csv_rows(out.read(latest))
    return [dict(zip(header, row, strict=False))["model"] for row in rows]


def _summary_number(file: str) -> int:
    """``summary.csv`` is the first, ``summary-2.csv`` the second…"""
    suffix = file[len("summary"):-len(".csv")].lstrip("-")
    return int(suffix) if suffix.isdigit() else 1


def resume(out: RunDir, models: Sequence[str]) -> tuple[dict[str, ModelResult], list[str]]:
    """The models already complete in ``out`` (as results) and the earlier files moved aside.

    A model's staging folders left by a killed sweep are recovered first
    (``lens.commit.recover``: a commit cut short is completed, an unfinished run removed).
    """
    done: dict[str, ModelResult] = {}
    for model in models:
        name = outputs.output_name(model)
        for note in recover(out, name):
            print(f"lens: {name}: {note}", file=sys.stderr, flush=True)
        result = complete_result(out, model)
        if result is not None:
            done[model] = result
    return done, set_aside(out, [m for m in models if m not in done])


def describe(done: Mapping[str, Any], moved: Sequence[str], total: int) -> str:
    text = f"lens: resume: {len(done)} of {total} models complete, running {total - len(done)}"
    if moved:
        text += f"; earlier files moved to {moved[0].rsplit('/', 1)[0]}/"
    return text
