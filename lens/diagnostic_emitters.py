"""The emitters that check the lens itself rather than record what it reads.

``RawLensCheck`` compares the lens with the raw (un-normalised) lens at
sampled layers; ``LastLayerConsistency`` compares the last layer with the
model's own head. Both read the last position only and write the
diagnostics of ``docs/outputs.md`` (``raw_lens_check``, ``last_layer_consistency``),
never the records CSVs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from lens import metrics
from lens.emitters import LayerStep, PassContext, Rows, scalars
from lens.lenses import Lens
from lens.records import ConsistencyRecord, RawCheckRecord, Record


def depth_layers(n_layers: int) -> tuple[int, ...]:
    """Post-block layers at depth ≈ 25/50/75 %: ``n//4+1``, ``n//2+1``, ``3n//4+1`` (≤ n)."""
    picks = (n_layers // 4 + 1, n_layers // 2 + 1, 3 * n_layers // 4 + 1)
    return tuple(sorted({min(p, n_layers) for p in picks}))


def raw_check_layers(mode: str, n_layers: int) -> tuple[int, ...]:
    """Layers the raw-vs-norm check samples: 0 and depth ≈ 25/50/75 %, or all."""
    if mode == "off":
        return ()
    if mode == "full":
        return tuple(range(n_layers + 1))
    return tuple(sorted({0, *depth_layers(n_layers)}))


class RawLensCheck:
    """Compare the step's lens with the raw (un-normalised) lens at sampled layers.

    The raw lens's rows come from ``prefetch_raw_checks`` when the pass runner
    decoded them beforehand (one matmul for every pass of a chunk), else the
    check decodes its row itself.
    """

    rows: Rows = "last"

    def __init__(self, raw: Lens) -> None:
        self.raw = raw
        self.prefetched: dict[tuple[PassContext, int], Tensor] = {}
        """(pass, layer) → the raw lens's logits at the pass's last position
        (``prefetch_raw_checks``)."""

    def emit(self, step: LayerStep) -> Iterable[Record]:
        ctx = step.ctx
        if step.layer not in raw_check_layers(ctx.config.raw_lens, ctx.n_layers):
            return
        last = step.last_row
        raw_logits = self.prefetched.get((ctx, step.layer))
        if raw_logits is None:
            raw_logits = self.raw.forward(step.resid[last:last + 1], step.layer)[0]
        logp = step.row("logp", last)
        raw_logp = metrics.log_probs(raw_logits, logp.dtype)
        norm = scalars(logp, ctx.gold, ctx.table)
        raw = scalars(raw_logp, ctx.gold, ctx.table)
        yield RawCheckRecord(
            lens=step.lens, layer=step.layer,
            kl_norm_vs_raw_bits=metrics.settle(metrics.kl_bits(logp, raw_logp)),
            top1_agree=norm.top1_id == raw.top1_id if norm.finite and raw.finite else None,
            p_top1_norm=norm.p_top1, p_top1_raw=raw.p_top1,
            p_answer_norm=norm.p_answer, p_answer_raw=raw.p_answer,
            answer_rank_norm=norm.rank, answer_rank_raw=raw.rank,
            is_answer_norm=norm.is_answer, is_answer_raw=raw.is_answer,
        )


def prefetch_raw_checks(checks: Sequence[tuple[RawLensCheck, PassContext, Tensor]]) -> None:
    """Decode the raw-lens rows of many checks at once: one matmul per raw lens.

    Each check gets, for every layer it samples, the raw lens's logits at its
    pass's last position (``(n_layers + 1, seq, d_model)`` residuals). A single
    row per matmul reads the whole unembedding for one row of logits: 15 ms
    on CPU for SmolLM2, 1.4 s of a 24-fact probe's five sampled layers.
    """
    by_lens: dict[int, list[tuple[RawLensCheck, PassContext, int, Tensor]]] = {}
    for check, ctx, resids in checks:
        for layer in raw_check_layers(ctx.config.raw_lens, ctx.n_layers):
            by_lens.setdefault(id(check.raw), []).append(
                (check, ctx, layer, resids[layer, ctx.last]))
    for rows in by_lens.values():
        logits = rows[0][0].raw.decode_rows([(row, layer) for _, _, layer, row in rows])
        for (check, ctx, layer, _), z in zip(rows, logits, strict=True):
            check.prefetched[ctx, layer] = z


TEMPERATURES = torch.logspace(-1, 1, 25, dtype=torch.float64)


class LastLayerConsistency:
    """At the last layer: the lens against the model's own head (docs/outputs.md)."""

    rows: Rows = "last"

    def emit(self, step: LayerStep) -> Iterable[Record]:
        ctx = step.ctx
        if step.layer != ctx.n_layers:
            return
        last = step.last_row
        z = step.row("logits", last)
        logp = step.row("logp", last)
        target = ctx.head_logp.to(logp.dtype)
        kl = metrics.settle(metrics.kl_bits(logp, target))
        lens_s = scalars(logp, ctx.gold, ctx.table)
        head_s = scalars(target, ctx.gold, ctx.table)
        temps = TEMPERATURES.to(device=z.device, dtype=z.dtype)
        kls = metrics.kl_bits(torch.log_softmax(z[None, :] / temps[:, None], dim=-1),
                              target[None, :])
        best = int(torch.argmin(kls))
        scale, softcap = ctx.head_transform.get("scale"), ctx.head_transform.get("softcap")

        def kl_after(declared: bool) -> float | None:
            # z already went through the model's head (lens.unembed): a declared transform
            # is applied
            return kl if declared else None
        yield ConsistencyRecord(
            lens=step.lens, layer=step.layer, kl_to_final_bits=kl,
            top1_agree=(lens_s.top1_id == head_s.top1_id
                        if lens_s.finite and head_s.finite else None),
            p_top1_lens=lens_s.p_top1, p_top1_model=head_s.p_top1,
            p_answer_lens=lens_s.p_answer, answer_rank_lens=lens_s.rank,
            temp_est=float(temps[best]) if math.isfinite(kl) else math.nan,
            kl_after_temp_bits=metrics.settle(kls[best]),
            cfg_transform=tuple(ctx.head_transform.items()),
            kl_after_transform_bits=(("scale", kl_after(bool(scale))),
                                     ("softcap", kl_after(bool(softcap))),
                                     ("scale_then_softcap", kl_after(bool(scale and softcap)))),
            warn_high_last_layer_kl=kl > 0.5 if math.isfinite(kl) else None,
        )
