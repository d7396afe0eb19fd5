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


def to_pandas(records: Iterable[Record], kind: type = NextTokenRecord) -> Any:
    """The records of one type as a ``pandas.DataFrame``, one row each, columns = fields.

    Args:
        records: A run's records (``ModelRun.records``), of any types.
        kind: Which record type to keep (default: the pure next-token records).
    """
    import pandas as pd

    rows = [record_values(r) for r in records if type(r) is kind]
    return pd.DataFrame(rows, columns=[f.name for f in fields(kind)])
