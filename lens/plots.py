"""PNG plots of a run: the logit-lens heatmap, per-layer trajectories, and a sweep overview.

Everything is drawn on ``matplotlib.figure.Figure`` objects with the Agg
canvas (no ``pyplot``, so no global backend or figure state), under a fixed
style, at a fixed dpi, with sizes given in whole pixels and no ``Software``
metadata — the same run gives the same image. PNGs are not goldens: the CSVs
hold the numbers.

Files (beside the CSVs, ``--no-plots`` skips them):
- ``output-<name>-heatmap.png`` — pos/orig, layer × position, the top-1 token
  written in each cell, coloured by entropy (bits). One per fact: a probe
  with more than one fact writes ``output-<name>-heatmap-<fact_id>.png``.
- ``output-<name>-trajectories.png`` — p_answer, answer rank (log scale), KL
  to the final head and entropy per layer at the next-token position, for
  orig, no_filler and control, one line style per lens (``LENS_STYLES``; any
  other lens its own dash pattern). Over several facts each line is the median
  across facts and the band (norm lens) the interquartile range.
- ``plot_sweep`` — the same panels per model over depth / n_layers (pos/orig, norm lens).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lens.heatmap import plot_heatmap
from lens.plotkit import drawing, figure, minor_ticks_as_one_line, png
from lens.records import NextTokenRecord, PositionRecord
from lens.writers import read_csv_dicts, write_atomic

TRAJECTORY_SIZE = (1400, 1000)
SWEEP_SIZE = (1400, 1000)
VARIANTS = (("pos", "orig", "orig", "#1f77b4"), ("pos", "no_filler", "no_filler", "#ff7f0e"),
            ("ctl", "orig", "control", "#2ca02c"))
"""(prompt_id, variant, label, colour); earlier variants are drawn on top."""
LENS_STYLES: dict[str, tuple[Any, str]] = {
    "norm": ("-", "solid"), "logit": ("-.", "dash-dot"), "raw": (":", "dotted"),
    "prism": ("--", "dashed"), "tuned": ((0, (8, 2)), "long dashes")}
"""(matplotlib line style, its name in the title) per lens; a lens not named here gets
the next unused of ``EXTRA_STYLES``."""
EXTRA_STYLES: tuple[tuple[Any, str], ...] = (
    ((0, (3, 1, 1, 1, 1, 1)), "dash-dot-dot"), ((0, (1, 3)), "sparse dots"),
    ((0, (5, 3, 1, 3)), "loose dash-dot"), ((0, (2, 1)), "short dashes"))
PANELS = (("p_answer", "p(answer)", "linear"), ("answer_rank", "answer rank", "log"),
          ("kl_to_final_bits", "KL to final head (bits)", "linear"),
          ("entropy", "entropy (bits)", "linear"))


# --- 1. heatmap: lens.heatmap; 2. trajectories ---------------------------------


@dataclass(frozen=True)
class Point:
    """One pure next-token value set, from a record or a CSV row."""

    fact_id: str
    prompt_id: str
    variant: str
    lens: str
    layer: int
    values: dict[str, float]
    """p_answer, answer_rank, kl_to_final_bits, entropy (nan when missing)."""


def _num(value: object) -> float:
    if value is None or value == "":
        return math.nan
    return float(value)  # type: ignore[arg-type]


def points(rows: Iterable[NextTokenRecord | Mapping[str, str]], *,
           lens: str = "norm") -> list[Point]:
    """Normalise pure records, or rows of a pure CSV read as dicts, to ``Point``s.

    CSV rows carry no lens column: they get ``lens`` (the CSV's own lens).
    """
    out = []
    for r in rows:
        if isinstance(r, NextTokenRecord):
            out.append(Point(r.fact_id, r.prompt_id, r.variant, r.lens, r.layer,
                             {k: _num(getattr(r, k)) for k, _, _ in PANELS}))
        else:
            out.append(Point(r.get("fact_id", ""), r["prompt_id"], r["prompt_variant"], lens,
                             int(r["layer"]), {k: _num(r.get(k)) for k, _, _ in PANELS}))
    return out


def _series(pts: Sequence[Point],
            metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(layers, median, q25, q75) across facts, per layer, over the finite values.

    Layers with the same number of finite values go through ``np.median`` and
    ``np.percentile`` together, one row each (the same numbers as a call per
    layer, which cost more than drawing the trajectories did).
    """
    by_layer: dict[int, list[float]] = {}
    for p in pts:
        by_layer.setdefault(p.layer, []).append(p.values[metric])
    layers = sorted(by_layer)
    finite = [[x for x in by_layer[layer] if math.isfinite(x)] for layer in layers]
    stats = np.full((len(layers), 3), np.nan)
    for count in {len(values) for values in finite} - {0}:
        rows = [i for i, values in enumerate(finite) if len(values) == count]
        table = np.array([finite[i] for i in rows], dtype=float)
        stats[rows, 0] = np.median(table, axis=1)
        stats[rows, 1:] = np.percentile(table, [25, 75], axis=1).T
    return np.array(layers, dtype=float), stats[:, 0], stats[:, 1], stats[:, 2]


def lens_styles(lenses: Iterable[str]) -> dict[str, tuple[Any, str]]:
    """The line style of each lens present: those of ``LENS_STYLES`` in its order, then the
    others in order of appearance (a fixed order, so the same records draw the same PNG)."""
    seen = list(dict.fromkeys(lenses))
    present = [n for n in LENS_STYLES if n in seen] + [n for n in seen if n not in LENS_STYLES]
    extra = iter(EXTRA_STYLES * (1 + len(present)))
    return {name: LENS_STYLES.get(name) or next(extra) for name in present}


def _panels(fig: Any, xlabel: str, *, integer_x: bool) -> list[Any]:
    from matplotlib.ticker import MaxNLocator

    axes = fig.subplots(2, 2, gridspec_kw={"left": 0.07, "right": 0.98, "top": 0.92,
                                           "bottom": 0.16, "hspace": 0.28, "wspace": 0.18})
    flat = list(axes.flat)
    for ax, (_, label, scale) in zip(flat, PANELS, strict=True):
        ax.set_title(label, y=1.0)  # fixed y: skips the tight-bbox auto-placement
        ax.set_yscale(scale)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        if integer_x:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return flat


def _finish_panels(axes: Sequence[Any]) -> None:
    """Once every line is drawn: the log panels' minor ticks as one line (``plotkit``)."""
    for ax in axes:
        if ax.get_yscale() == "log":
            minor_ticks_as_one_line(ax)


PREPARED_TICKS = 16
"""Tick artists a prepared trajectories frame makes per axis (a panel shows about 10)."""
_prepared: list[tuple[Any, list[Any]]] = []
"""The trajectories frame made ahead (``prepare_trajectories``), at most one."""


def _trajectory_frame() -> tuple[Any, list[Any]]:
    fig = figure(*TRAJECTORY_SIZE)
    return fig, _panels(fig, "layer", integer_x=True)


def prepare_trajectories() -> None:
    """Make the next trajectories figure's frame now, while this process would be idle.

    A plot worker calls it beside the model load (``lens.plotpool``). The frame
    is what every trajectories figure has before its lines: the figure, the
    four panels with their titles, labels and grid, ``PREPARED_TICKS`` tick
    artists per axis, drawn once (text metrics and the renderer cached). That
    was about a quarter of the figure's time. ``plot_trajectories`` takes it and
    draws the bytes of a fresh figure (tests/test_plotprep.py): matplotlib makes
    tick artists when a draw first needs them and reuses them in later draws,
    as in any figure drawn twice, and the first draw sets no limit (autoscaling
    stays on, the data limits empty).
    """
    if _prepared:
        return
    with drawing():
        fig, axes = _trajectory_frame()
        for ax in axes:
            ax.xaxis.get_major_ticks(PREPARED_TICKS)
            ax.yaxis.get_major_ticks(PREPARED_TICKS)
        fig.canvas.draw()
    _prepared.append((fig, axes))


def plot_trajectories(records: Iterable[NextTokenRecord], *, title: str) -> bytes:
    """Per-layer p_answer, rank, KL and entropy for orig/no_filler/control × every lens.

    Args:
        records: Pure next-token records of any number of facts (and lenses).
        title: Figure title.
    """
    return trajectories_png(points(records), title=title)


def trajectories_png(pts: Sequence[Point], *, title: str) -> bytes:
    """``plot_trajectories`` of ``Point``s."""
    n_facts = len({p.fact_id for p in pts})
    styles = lens_styles(p.lens for p in pts)
    with drawing():
        fig, axes = _prepared.pop() if _prepared else _trajectory_frame()
        handles = []
        for rank, (prompt_id, variant, label, colour) in enumerate(VARIANTS):
            for lens, (dashes, _) in styles.items():
                key = (prompt_id, variant, lens)
                sel = [p for p in pts if (p.prompt_id, p.variant, p.lens) == key]
                if not sel:
                    continue
                line = None
                for ax, (metric, _, _) in zip(axes, PANELS, strict=True):
                    layers, med, q25, q75 = _series(sel, metric)
                    if not np.isfinite(med).any():
                        continue
                    line, = ax.plot(layers, med, linestyle=dashes, color=colour, linewidth=1.6,
                                    label=f"{label} · {lens}", zorder=3 + len(VARIANTS) - rank)
                    if n_facts > 1 and lens == "norm":
                        ax.fill_between(layers, q25, q75, color=colour, alpha=0.15, linewidth=0,
                                        zorder=1)
                if line is not None:
                    handles.append(line)
        if handles:
            fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 3),
                       frameon=False, handlelength=4)  # long enough to tell dash patterns apart
        suffix = f" — median over {n_facts} facts, band: interquartile range" if n_facts > 1 else ""
        fig.suptitle(title + suffix, parse_math=False)
        _finish_panels(axes)
        return png(fig)


# --- 3. sweep --------------------------------------------------------------------


@dataclass(frozen=True)
class SweepModel:
    """One model of a sweep: its name, depth and pure next-token records.

    ``pure`` holds ``NextTokenRecord``s, or the rows of its
    ``output-<name>-pure-next-token.csv`` as dicts (``sweep_model_from_dir``).
    """

    name: str
    n_layers: int
    pure: Sequence[NextTokenRecord | Mapping[str, str]]


def sweep_model_from_dir(out_dir: str | Path, name: str) -> SweepModel:
    """Read a model's written outputs (``output-<name>.json`` and its pure CSV) back for a sweep."""
    import json

    from lens.outputs import pure_file, report_file

    out_dir = Path(out_dir)
    report = json.loads((out_dir / report_file(name)).read_text(encoding="utf-8"))
    rows = read_csv_dicts((out_dir / pure_file(name)).read_bytes())
    return SweepModel(name=name, n_layers=int(report["model_stats"]["num_layers"]), pure=rows)


def plot_sweep(models: Sequence[SweepModel], path: str | Path | None = None) -> bytes:
    """All models' pos/orig trajectories (norm lens) on normalised depth, layer / n_layers.

    Over several facts each line is the median across facts. Returns the PNG
    bytes and, with ``path``, writes them there atomically.
    """
    import matplotlib

    colours = matplotlib.colormaps["tab10"]
    with drawing():
        fig = figure(*SWEEP_SIZE)
        axes = _panels(fig, "normalised depth (layer / n_layers)", integer_x=False)
        handles = []
        for i, model in enumerate(models):
            sel = [p for p in points(model.pure)
                   if (p.prompt_id, p.variant, p.lens) == ("pos", "orig", "norm")]
            line = None
            for ax, (metric, _, _) in zip(axes, PANELS, strict=True):
                layers, med, _, _ = _series(sel, metric)
                if sel and np.isfinite(med).any():
                    line, = ax.plot(layers / max(1, model.n_layers), med, "-",
                                    color=colours(i % 10), linewidth=1.6, label=model.name)
            if line is not None:
                handles.append(line)
        if handles:
            fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4),
                       frameon=False)
        fig.suptitle("logit lens across models: pos/orig, norm lens", parse_math=False)
        _finish_panels(axes)
        data = png(fig)
    if path is not None:
        write_atomic(Path(path), data)
    return data


# --- a run's files ---------------------------------------------------------------


@dataclass(frozen=True)
class PlotJob:
    """One PNG of a run, as plain data: it may be drawn in a worker (``lens.plotpool``)."""

    file: str
    kind: str
    """``heatmap`` (``plot_heatmap``) or ``trajectories`` (``plot_trajectories``)."""
    records: tuple[PositionRecord | NextTokenRecord, ...]
    title: str
    n_layers: int = 0
    """Heatmaps only: the model's number of blocks."""

    def draw(self) -> bytes:
        if self.kind == "heatmap":
            return plot_heatmap(self.records, n_layers=self.n_layers,  # type: ignore[arg-type]
                                title=self.title)
        return plot_trajectories(self.records, title=self.title)  # type: ignore[arg-type]


def heatmap_job(model: Any, fact_id: str, passes: Any, *, multi: bool) -> PlotJob:
    """One fact's heatmap, from its passes (``lens.passes.PassResult``) as soon as they
    are done: the job ``plot_jobs`` makes for it (``lens.runmodel`` submits it early)."""
    from lens.outputs import heatmap_file

    recs = tuple(r for p in passes for r in p.records
                 if isinstance(r, PositionRecord) and r.lens == "norm"
                 and (r.prompt_id, r.variant) == ("pos", "orig"))
    return PlotJob(
        heatmap_file(model.name, fact_id if multi else None), "heatmap", recs,
        n_layers=model.n_layers,
        title=f"{model.name} · {fact_id} · pos/orig: top-1 token by layer, colour = entropy (bits)")


def plot_jobs(run: Any) -> list[PlotJob]:
    """The PNGs of one model's run (``lens.report.ModelRun``): a heatmap per fact, then the
    trajectories."""
    from lens.outputs import trajectories_file

    name, multi = run.model.name, run.probe.is_multi
    jobs = [heatmap_job(run.model, fr.fact.id, fr.passes, multi=multi) for fr in run.facts]
    pure = tuple(r for r in run.records if isinstance(r, NextTokenRecord))
    what = f"probe {run.probe.name}" if multi else run.facts[0].fact.id
    legend = ", ".join(f"{lens} {name}"
                       for lens, (_, name) in lens_styles(r.lens for r in pure).items())
    jobs.append(PlotJob(trajectories_file(name), "trajectories", pure,
                        title=f"{name} · {what}: next-token trajectories ({legend})"))
    return jobs


def draw_in_process(jobs: Sequence[PlotJob]) -> dict[str, bytes]:
    """File name → PNG bytes of each job, drawn here, in order."""
    return {job.file: job.draw() for job in jobs}


def plot_files(run: Any) -> dict[str, bytes]:
    """File name → PNG bytes for one model's run, drawn in this process."""
    return draw_in_process(plot_jobs(run))
