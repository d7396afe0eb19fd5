"""Records: what the emitters produce and the writers turn into bytes, as plain values.

Every record is a frozen dataclass of str/int/float/bool/None (and tuples of
them), tagged with the lens that decoded it. Per-position and pure next-token
records share one prefix (``TokenRecord``): the columns both CSVs start with.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

NEXT_TOKEN = "⟨NEXT⟩"
"""The ``token`` of a pure next-token record."""


@dataclass(frozen=True)
class TokenRecord:
    """The prefix every token-level record shares: where, under which lens, and the top-k."""

    lens: str
    prompt_id: str
    variant: str
    layer: int
    pos: int
    token: str
    entropy: float
    """Bits."""
    topk: tuple[tuple[str, float], ...]
    """(token text, probability) pairs, most probable first."""
    rest_mass: float
    """1 − the probability the top-k pairs hold."""
    fact_id: str = field(default="", kw_only=True)
    """The probe fact this record belongs to."""


@dataclass(frozen=True)
class PositionRecord(TokenRecord):
    """Entropy and top-k at one input position (the records CSV)."""


@dataclass(frozen=True, kw_only=True)
class NextTokenRecord(TokenRecord):
    """The pure next-token record at the last position (the pure next-token CSV)."""

    copy_collapse: bool | None
    entropy_collapse: bool | None
    is_answer: bool | None
    p_top1: float
    p_top5: float
    p_answer: float | None
    kl_to_final_bits: float
    answer_rank: int | None
    cos_to_final: float
    control_margin: float | None


@dataclass(frozen=True)
class RawCheckRecord:
    """The step's lens against the raw (un-normalised) lens at one sampled layer."""

    lens: str
    layer: int
    kl_norm_vs_raw_bits: float
    top1_agree: bool | None
    p_top1_norm: float
    p_top1_raw: float
    p_answer_norm: float | None
    p_answer_raw: float | None
    answer_rank_norm: int | None
    answer_rank_raw: int | None
    is_answer_norm: bool | None
    is_answer_raw: bool | None


@dataclass(frozen=True)
class ConsistencyRecord:
    """The step's lens against the model's own head at the last layer."""

    lens: str
    layer: int
    kl_to_final_bits: float
    top1_agree: bool | None
    p_top1_lens: float
    p_top1_model: float
    p_answer_lens: float | None
    answer_rank_lens: int | None
    temp_est: float
    kl_after_temp_bits: float
    cfg_transform: tuple[tuple[str, float | None], ...]
    kl_after_transform_bits: tuple[tuple[str, float | None], ...]
    warn_high_last_layer_kl: bool | None


Record = PositionRecord | NextTokenRecord | RawCheckRecord | ConsistencyRecord


def record_values(record: Record) -> dict[str, Any]:
    """A record as ``{field: value}`` in field order."""
    return {f.name: getattr(record, f.name) for f in fields(record)}


def to_pandas(records: Iterable[Record], kind: type | None = None) -> Any:
    """One row per record, one column per field (``topk`` stays a tuple of (token, p)).

    Args:
        records: E.g. ``run.records`` (``ModelRun.records``).
        kind: Keep only records of this type (``lens.NextTokenRecord``…); needed
            when ``records`` mixes types, since each type has its own columns.
    """
    import pandas as pd

    rows = [r for r in records if kind is None or type(r) is kind]
    kinds = sorted({type(r).__name__ for r in rows})
    if len(kinds) > 1:
        raise ValueError(f"records of {len(kinds)} types ({', '.join(kinds)}) have different "
                         f"columns; pick one, e.g. to_pandas(records, lens.{kinds[0]})")
    record_type = kind or (type(rows[0]) if rows else None)
    columns = [f.name for f in fields(record_type)] if record_type is not None else []
    return pd.DataFrame([record_values(r) for r in rows], columns=columns)
