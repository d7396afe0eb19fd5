"""Layer steps and the emitters that turn them into records (``lens.records``).

An emitter is a pure function of a ``LayerStep``: emitting the same step twice
gives equal records. Per-pass state (the copy window) is kept by the pass and
handed to emitters inside the step, so emitters never carry state between
passes or lenses. An emitter also says which rows it reads (``rows``): the
pass decodes every position only for a lens one of whose emitters needs them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from lens import metrics
from lens.config import RunConfig
from lens.gold import GoldAnswer
from lens.records import (
    NEXT_TOKEN,
    NextTokenRecord,
    PositionRecord,
    Record,
)
from lens.steptensors import StepTensors
from lens.tokens import TokenTable

Rows = Literal["all", "last"]
"""Which positions an emitter reads: every one, or the prompt's last only."""
ROWS: tuple[Rows, ...] = ("all", "last")


@dataclass(frozen=True, eq=False)
class PassContext:
    """What a pass knows before decoding: prompt, tokens, gold answers, the model head."""

    prompt_id: str
    variant: str
    prompt: str
    input_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    """Display text of each input position."""
    context_ids: tuple[int, ...]
    """The prompt tokenised without special tokens (copy detection)."""
    gold: GoldAnswer
    contrast_first_id: int | None
    """First id of the positive answer, on control passes (control margin)."""
    head_logits: Tensor
    """(d_vocab,) the model's own logits at the last position."""
    head_logp: Tensor
    """(d_vocab,) their log-softmax in the analysis dtype."""
    verbose: tuple[bool, ...]
    """Per position: write the long top-k."""
    n_layers: int
    config: RunConfig
    table: TokenTable
    head_transform: dict[str, Any]
    """``cfg_transform``: the model head's logit transform (``HeadTransform.as_json``)."""
    fact_id: str = ""
    """The probe fact this pass belongs to."""

    @property
    def last(self) -> int:
        return len(self.input_ids) - 1


@dataclass(frozen=True)
class RowValues:
    """A step's per-row numbers as Python values, converted once per decoded chunk."""

    finite: Sequence[bool]
    """Per row: every logit finite."""
    entropy: Sequence[float]
    top_ids: Sequence[Sequence[int]]
    """Per row: the top-K ids (K = the largest top-k written), most probable first."""
    top_p: Sequence[Sequence[float]]
    """Per row: their probabilities."""


@dataclass(frozen=True)
class LastRow:
    """The last position's numbers under one lens at one layer.

    Computed for every layer and pass of a decoded chunk at once
    (``lens.decode.last_rows``); when ``finite`` is False the others mean nothing.
    """

    finite: bool
    """Every log-probability finite."""
    top1_id: int
    """``argmax`` (the first of tied maxima)."""
    p_top1: float
    p_answer: float | None
    """None when the gold answer has no first id."""
    rank: int | None
    kl_bits: float
    """KL to the model's head, in bits, unrounded."""
    cosine: float
    """Cosine of the logits to the head's logits."""
    p_contrast: float | None
    """Probability of the control's contrast id (control passes), else None."""


@dataclass(frozen=True, eq=False)
class LayerStep:
    """One layer of one pass decoded by one lens.

    Its tensors (``resid``, ``logits``, …: properties, made when first read,
    ``StepTensors``) are valid while it is being emitted: the next chunk of
    layers is decoded into the same buffers (``kept`` makes a copy that lasts).
    """

    ctx: PassContext
    lens: str
    layer: int
    window: tuple[int, ...]
    """Top-1 ids at the last position of the last ≤ k layers, this layer's last."""
    values: RowValues
    """``entropy``, finiteness and the top-k of every row, as Python values."""
    last: LastRow
    """The last position's answer-related numbers."""
    tensors: StepTensors
    """Where the tensors below come from."""

    @property
    def resid(self) -> Tensor:
        """(seq, d_model) the residual stream after this layer."""
        return self.tensors.get("resid")

    @property
    def logits(self) -> Tensor:
        """(seq, d_vocab) lens logits in the analysis dtype."""
        return self.tensors.get("logits")

    @property
    def logp(self) -> Tensor:
        """(seq, d_vocab) log-softmax of ``logits``."""
        return self.tensors.get("logp")

    @property
    def entropy(self) -> Tensor:
        """(seq,) entropy in bits."""
        return self.tensors.get("entropy")

    @property
    def top_p(self) -> Tensor:
        """(seq, K) probabilities of the top-K tokens, K = the largest top-k written."""
        return self.tensors.get("top_p")

    @property
    def top_ids(self) -> Tensor:
        """(seq, K) their ids."""
        return self.tensors.get("top_ids")

    def row(self, name: str, row: int) -> Tensor:
        """Row ``row`` of ``logits``, ``logp``, ``entropy``, ``top_p`` or ``top_ids``: a view,
        without making the whole tensor (an emitter that reads one row)."""
        return self.tensors.row(name, row)

    def kept(self) -> LayerStep:
        """This step with tensors of its own, to hold after the next step arrives.

        A step's tensors are views of decode buffers that the next chunk of
        layers overwrites (``lens.decode``); emitters read them at once and
        need no copy.
        """
        return replace(self, tensors=self.tensors.copy())

    @property
    def last_row(self) -> int:
        """Row of the prompt's last position in this step's tensors.

        ``seq - 1`` for a step over every position; ``0`` for a step decoded at
        the last position only (the next-token-only lenses).
        """
        return self.tensors.n_rows - 1


@runtime_checkable
class Emitter(Protocol):
    """Turns one decoded layer into records.

    ``rows`` says which positions ``emit`` reads: ``"last"`` emitters also get
    steps decoded at the last position only (``LayerStep.last_row``).
    """

    rows: Rows

    def emit(self, step: LayerStep) -> Iterable[Record]: ...


def _topk_pairs(step: LayerStep, row: int, k: int) -> tuple[tuple[str, float], ...]:
    ids, probs = step.values.top_ids[row][:k], step.values.top_p[row][:k]
    return tuple(zip(step.ctx.table.texts(ids), probs, strict=True))


def _rest(pairs: Sequence[tuple[str, float]]) -> float:
    return metrics.settle(max(0.0, 1.0 - math.fsum(p for _, p in pairs)))


class PositionEmitter:
    """Entropy and top-k at every position (top-20 where verbose, else top-5)."""

    rows: Rows = "all"

    def emit(self, step: LayerStep) -> Iterable[Record]:
        ctx, values = step.ctx, step.values
        for pos, token in enumerate(ctx.tokens):
            k = ctx.config.topk_verbose if ctx.verbose[pos] else ctx.config.topk_brief
            finite = values.finite[pos]
            pairs = _topk_pairs(step, pos, k) if finite else ()
            yield PositionRecord(step.lens, ctx.prompt_id, ctx.variant, step.layer, pos, token,
                                 values.entropy[pos] if finite else math.nan, pairs,
                                 _rest(pairs) if finite else math.nan, fact_id=ctx.fact_id)


@dataclass(frozen=True)
class Scalars:
    """The last position's answer-related numbers under one distribution."""

    p_top1: float
    top1_id: int | None
    p_answer: float | None
    rank: int | None
    is_answer: bool | None

    @property
    def finite(self) -> bool:
        return self.top1_id is not None


def scalars(logp: Tensor, gold: GoldAnswer, table: TokenTable) -> Scalars:
    """p_top1, p_answer, rank and is_answer of one (d_vocab,) log-distribution.

    A distribution with non-finite values gives NaN and None (written as null):
    a rank counted against NaN would claim rank 1.
    """
    if not bool(torch.isfinite(logp).all()):
        return _non_finite_scalars(gold)
    top = int(torch.argmax(logp))
    if gold.first_id is None:
        return _judged(float(logp[top].exp()), top, None, None, gold, table)
    return _judged(float(logp[top].exp()), top, float(logp[gold.first_id].exp()),
                   int(metrics.answer_rank(logp, gold.first_id)), gold, table)


def last_scalars(last: LastRow, gold: GoldAnswer, table: TokenTable) -> Scalars:
    """``scalars`` of the last position, from the numbers its chunk computed."""
    if not last.finite:
        return _non_finite_scalars(gold)
    return _judged(last.p_top1, last.top1_id, last.p_answer, last.rank, gold, table)


def _non_finite_scalars(gold: GoldAnswer) -> Scalars:
    return Scalars(math.nan, None, None if gold.first_id is None else math.nan, None, None)


def _judged(p_top1: float, top: int, p_answer: float | None, rank: int | None,
            gold: GoldAnswer, table: TokenTable) -> Scalars:
    """is_answer: rank 1 of the gold id, or (no gold id) the top-1 text equal to the gold string."""
    if gold.first_id is not None:
        return Scalars(p_top1, top, p_answer, rank, rank == 1)
    return Scalars(p_top1, top, None, None, table.text(top).strip() == gold.string.strip())


class NextTokenEmitter:
    """The pure next-token record at the last position (docs/outputs.md, Pure next-token CSV).

    Works on full steps and on steps decoded at the last position only.
    """

    rows: Rows = "last"

    def emit(self, step: LayerStep) -> Iterable[Record]:
        ctx, cfg, row, last = step.ctx, step.ctx.config, step.last_row, step.last
        s = last_scalars(last, ctx.gold, ctx.table)
        if not s.finite:
            yield self._non_finite(step)
            return
        pairs = _topk_pairs(step, row, cfg.topk_brief)
        top_p = step.values.top_p[row]
        p2 = top_p[1] if len(top_p) > 1 else 0.0
        entropy = step.values.entropy[row]
        margin = None
        if last.p_contrast is not None and s.p_answer is not None:
            margin = metrics.settle(s.p_answer - last.p_contrast)
        yield NextTokenRecord(
            lens=step.lens, prompt_id=ctx.prompt_id, variant=ctx.variant, layer=step.layer,
            pos=ctx.last, token=NEXT_TOKEN, entropy=entropy, topk=pairs, rest_mass=_rest(pairs),
            copy_collapse=metrics.copy_collapse(
                step.window, ctx.context_ids, p_top1=s.p_top1, p_top2=p2,
                top1_text=ctx.table.text(s.top1_id), threshold=cfg.copy_threshold,
                margin=cfg.copy_margin, k=cfg.copy_window_k),
            entropy_collapse=entropy <= 1.0,
            is_answer=s.is_answer,
            p_top1=s.p_top1,
            p_top5=math.fsum(p for _, p in pairs[:5]),
            p_answer=s.p_answer,
            kl_to_final_bits=metrics.settle(last.kl_bits),
            answer_rank=s.rank,
            cos_to_final=last.cosine,
            control_margin=margin,
            fact_id=ctx.fact_id,
        )

    @staticmethod
    def _non_finite(step: LayerStep) -> NextTokenRecord:
        """The record of a layer whose logits are not finite: every metric null."""
        ctx, nan = step.ctx, math.nan
        return NextTokenRecord(
            lens=step.lens, prompt_id=ctx.prompt_id, variant=ctx.variant, layer=step.layer,
            pos=ctx.last, token=NEXT_TOKEN, entropy=nan, topk=(), rest_mass=nan,
            copy_collapse=None, entropy_collapse=None, is_answer=None, p_top1=nan, p_top5=nan,
            p_answer=None if ctx.gold.first_id is None else nan, kl_to_final_bits=nan,
            answer_rank=None, cos_to_final=nan, control_margin=None, fact_id=ctx.fact_id)
