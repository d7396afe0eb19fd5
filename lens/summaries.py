"""Summaries: pure functions over records (SPEC §6)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lens.records import ConsistencyRecord, NextTokenRecord, RawCheckRecord, record_values


def first_layer(records: Sequence[NextTokenRecord], test: Callable[[NextTokenRecord], bool]) -> int | None:
    """The first layer whose record passes ``test``; None if none does."""
    return next((r.layer for r in sorted(records, key=lambda r: r.layer) if test(r)), None)


def _delta(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a - b


def collapse_summary(records: Sequence[NextTokenRecord], *, copy_threshold: float,
                     copy_window_k: int) -> dict[str, Any]:
    """L_copy, L_semantic and the KL/rank milestones of one pass's pure records."""
    l_copy = first_layer(records, lambda r: r.copy_collapse)
    l_sem = first_layer(records, lambda r: r.is_answer)

    def rank_le(k: int) -> int | None:
        return first_layer(records, lambda r: r.answer_rank is not None and r.answer_rank <= k)

    return {
        "L_copy": l_copy,
        "L_copy_H": first_layer(records, lambda r: r.entropy_collapse),
        "L_semantic": l_sem,
        "delta_layers": _delta(l_sem, l_copy),
        "copy_thresh": copy_threshold,
        "copy_window_k": copy_window_k,
        "copy_match_level": "id_subsequence",
        "first_kl_below_0.5": first_layer(records, lambda r: r.kl_to_final_bits <= 0.5),
        "first_kl_below_1.0": first_layer(records, lambda r: r.kl_to_final_bits <= 1.0),
        "first_rank_le_1": rank_le(1),
        "first_rank_le_5": rank_le(5),
        "first_rank_le_10": rank_le(10),
    }


def lens_summary(records: Sequence[NextTokenRecord]) -> dict[str, Any]:
    """``diagnostics.lens_summaries.<lens>``: a sidecar lens's milestones on its pos/orig records.

    ``last_layer_kl_bits`` is the lens's KL to the model's head at the last
    layer (None when the lens wrote no finite value there).
    """
    def rank_le(k: int) -> int | None:
        return first_layer(records, lambda r: r.answer_rank is not None and r.answer_rank <= k)

    last = max(records, key=lambda r: r.layer, default=None)
    return {
        "L_semantic": first_layer(records, lambda r: r.is_answer),
        "first_rank_le_1": rank_le(1),
        "first_rank_le_5": rank_le(5),
        "first_rank_le_10": rank_le(10),
        "first_kl_below_0.5": first_layer(records, lambda r: r.kl_to_final_bits <= 0.5),
        "first_kl_below_1.0": first_layer(records, lambda r: r.kl_to_final_bits <= 1.0),
        "last_layer_kl_bits": last.kl_to_final_bits if last is not None else None,
    }


def ablation_summary(orig: Sequence[NextTokenRecord], no_filler: Sequence[NextTokenRecord]) -> dict[str, Any]:
    """Copy and semantic layers with and without the filler word (deltas = nf − orig)."""
    l_copy_o = first_layer(orig, lambda r: r.copy_collapse)
    l_sem_o = first_layer(orig, lambda r: r.is_answer)
    l_copy_n = first_layer(no_filler, lambda r: r.copy_collapse) if no_filler else None
    l_sem_n = first_layer(no_filler, lambda r: r.is_answer) if no_filler else None
    return {
        "L_copy_orig": l_copy_o,
        "L_sem_orig": l_sem_o,
        "L_copy_nf": l_copy_n,
        "L_sem_nf": l_sem_n,
        "delta_L_copy": _delta(l_copy_n, l_copy_o),
        "delta_L_sem": _delta(l_sem_n, l_sem_o),
    }


def control_summary(control: Sequence[NextTokenRecord]) -> dict[str, Any]:
    """First layer where the control answer beats the positive one, and the largest margin."""
    margins = [r.control_margin for r in control if r.control_margin is not None]
    return {
        "first_control_margin_pos": first_layer(
            control, lambda r: r.control_margin is not None and r.control_margin > 0),
        "max_control_margin": max(margins) if margins else None,
    }


def raw_lens_summary(mode: str, samples: Sequence[RawCheckRecord]) -> dict[str, Any]:
    """The raw-vs-norm check block: samples plus the lens-artifact risk."""
    rows = [{k: v for k, v in record_values(s).items() if k != "lens"} for s in samples]
    norm_only = next((s.layer for s in samples if s.is_answer_norm and not s.is_answer_raw), None)
    kls = [s.kl_norm_vs_raw_bits for s in samples]
    max_kl = max(kls) if kls else None
    if norm_only is not None or (max_kl is not None and max_kl >= 1.0):
        risk = "high"
    elif max_kl is not None and max_kl >= 0.5:
        risk = "medium"
    else:
        risk = "low"
    return {
        "mode": mode,
        "samples": rows,
        "summary": {
            "first_norm_only_semantic_layer": norm_only,
            "max_kl_norm_vs_raw_bits": max_kl,
            "lens_artifact_risk": risk if samples else None,
        },
    }


def consistency_summary(record: ConsistencyRecord | None) -> dict[str, Any] | None:
    """The last-layer consistency block as JSON-ready values."""
    if record is None:
        return None
    values = {k: v for k, v in record_values(record).items() if k not in ("lens", "layer")}
    values["cfg_transform"] = dict(record.cfg_transform)
    values["kl_after_transform_bits"] = dict(record.kl_after_transform_bits)
    return values


def non_finite_summary(passes: Sequence[tuple[str, int | None]]) -> dict[str, Any] | None:
    """Where NaN/Inf first appeared: per pass the first non-finite layer (n+1 = only the head).

    None when every pass stayed finite; otherwise metrics from those layers on
    are written as null, never as numbers computed from garbage.
    """
    bad = {label: layer for label, layer in passes if layer is not None}
    if not bad:
        return None
    first = next(iter(bad))
    return {"first_pass": first, "first_layer": bad[first], "passes": bad}
