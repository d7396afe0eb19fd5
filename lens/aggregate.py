"""Statistics across the facts of a probe: medians with seeded bootstrap intervals.

For each metric the per-fact values come from the fact's ``pos/orig`` (and
``pos/no_filler``) pure next-token records, exactly as the per-fact JSON
reports them. A fact whose value is null (never collapsed, no ablation) is left
out of that statistic and counted in ``n_missing``; the paired difference uses
only the facts where both values exist.

The interval is the percentile bootstrap of the median: ``RESAMPLES`` (2000)
resamples of the facts with replacement, drawn from
``numpy.random.Generator(PCG64(316))`` created afresh for every statistic (so a
statistic never depends on which others were computed before it), and the
2.5th/97.5th percentiles (``numpy.percentile``, linear interpolation) of the
resampled medians.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lens.config import SEED
from lens.records import NextTokenRecord
from lens.summaries import first_layer

RESAMPLES = 2000
CONFIDENCE = 0.95
METRICS = ("L_copy", "L_semantic", "L_copy_frac", "L_semantic_frac", "first_kl_below_1.0",
           "first_rank_le_1")
"""Aggregated metrics; ``*_frac`` = the layer divided by the number of layers (depth fraction)."""
PAIRED = "orig_minus_no_filler"


def fact_metrics(records: Sequence[NextTokenRecord], n_layers: int) -> dict[str, float | int | None]:
    """The aggregated metrics of one pass's pure records (None where a milestone is never reached)."""
    l_copy = first_layer(records, lambda r: r.copy_collapse)
    l_sem = first_layer(records, lambda r: r.is_answer)
    return {
        "L_copy": l_copy,
        "L_semantic": l_sem,
        "L_copy_frac": None if l_copy is None else l_copy / n_layers,
        "L_semantic_frac": None if l_sem is None else l_sem / n_layers,
        "first_kl_below_1.0": first_layer(records, lambda r: r.kl_to_final_bits <= 1.0),
        "first_rank_le_1": first_layer(
            records, lambda r: r.answer_rank is not None and r.answer_rank <= 1),
    }


def median_ci(values: Sequence[float | int | None], *, seed: int = SEED,
              resamples: int = RESAMPLES, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Median and percentile-bootstrap interval of the non-null ``values``.

    Returns:
        ``{n, n_missing, median, ci_low, ci_high}``; the numbers are None when
        no value is present. One value gives a zero-width interval.
    """
    present = np.array([v for v in values if v is not None], dtype=np.float64)
    n = int(present.size)
    out: dict[str, Any] = {"n": n, "n_missing": len(values) - n,
                           "median": None, "ci_low": None, "ci_high": None}
    if n == 0:
        return out
    rng = np.random.Generator(np.random.PCG64(seed))
    medians = np.median(present[rng.integers(0, n, size=(resamples, n))], axis=1)
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(medians, [tail, 100.0 - tail])
    out.update(median=float(np.median(present)), ci_low=float(low), ci_high=float(high))
    return out


FactRecords = Sequence[tuple[str, Sequence[NextTokenRecord], Sequence[NextTokenRecord] | None]]
"""Per fact: its id, its ``pos/orig`` pure records, and its ``pos/no_filler`` pure
records (None when the fact has no ablation)."""


def aggregate_report(*, model_id: str, probe: str, n_layers: int, lens: str,
                     facts: FactRecords,
                     sidecars: Mapping[str, FactRecords] | None = None) -> dict[str, Any]:
    """``output-<name>-aggregate.json``.

    Args:
        model_id: The model as given on the command line.
        probe: The probe's name.
        n_layers: Number of blocks (the depth the fractions divide by).
        lens: The lens whose records are aggregated (the primary, ``norm``).
        facts: The primary lens's records per fact.
        sidecars: Per sidecar lens, its records per fact: the same statistics
            under ``sidecar_metrics.<lens>``.
    """
    return {
        "type": "aggregate",
        "model": model_id,
        "probe": probe,
        "lens": lens,
        "n_facts": len(facts),
        "fact_ids": [fid for fid, _, _ in facts],
        "num_layers": n_layers,
        "statistic": {"center": "median", "interval": "percentile_bootstrap",
                      "confidence": CONFIDENCE, "resamples": RESAMPLES, "seed": SEED,
                      "missing": "excluded_and_counted"},
        "metrics": _metrics(facts, n_layers),
        "sidecar_metrics": {name: _metrics(recs, n_layers)
                            for name, recs in (sidecars or {}).items()},
    }


def _metrics(facts: FactRecords, n_layers: int) -> dict[str, Any]:
    """Every metric's median and interval for orig, no_filler and their paired difference."""
    orig = [fact_metrics(o, n_layers) for _, o, _ in facts]
    nf = [fact_metrics(n, n_layers) if n is not None else None for _, _, n in facts]
    metrics: dict[str, Any] = {}
    for name in METRICS:
        o_vals = [m[name] for m in orig]
        n_vals = [m[name] if m is not None else None for m in nf]
        diffs = [None if a is None or b is None else a - b
                 for a, b in zip(o_vals, n_vals, strict=True)]
        metrics[name] = {"orig": median_ci(o_vals), "no_filler": median_ci(n_vals),
                         PAIRED: median_ci(diffs)}
    return metrics
