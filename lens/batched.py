"""Many passes at once: each lens decodes the rows of every pass in shared matmuls.

A probe with many facts runs its passes in padded batches of forwards
(``lens.model.capture_batch``). Decoding them one pass at a time would then
cost one small matmul per pass and lens chunk; here the rows of every pass of
a batch that one lens decodes (all positions of pos/orig, the last position of
the others, see ``Pass.routes``) are concatenated, so one matmul serves many
facts. The records are those of each pass's own ``Pass.run``, in the same
order: every (pass, route) gets its steps in layer order and its own copy
window, and the routes' records are joined in routing-table order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from lens.emitters import LayerStep, PassContext
from lens.lenses import Lens
from lens.model import Capture
from lens.passes import (
    CHUNK_ELEMENTS,
    Analysis,
    Pass,
    PassResult,
    decoded_chunks,
    first_non_finite_layer,
)
from lens.records import Record
from lens.timing import StageTimer, maybe_iterate, maybe_stage
from lens.windows import RollingWindow


def decode_many(items: Sequence[tuple[PassContext, Tensor]], lens: Lens, *,
                widest: int | None = None) -> Iterator[tuple[int, LayerStep]]:
    """Decode several passes' rows with shared matmuls; yield ``(item index, step)``.

    Each item is a pass context and its residual rows ``(n_layers + 1, rows_i,
    d_model)``. Items are grouped so that one layer of a group fits the budget,
    then each group is decoded in chunks of layers. A chunk holds at most the
    logits of a third of the layers of one pass of ``widest`` positions
    (default: the widest item; and at most ``CHUNK_ELEMENTS``), the bound
    ``decode_steps`` keeps for one pass, and is let go before the next one is
    decoded. Steps are views of their chunk.
    """
    if not items:
        return
    n_layers = items[0][1].shape[0]
    vocab = lens.unembed.d_vocab
    dtype = items[0][0].head_logp.dtype
    config = items[0][0].config
    k = min(max(config.topk_verbose, config.topk_brief), vocab)
    widest = widest or max(r.shape[1] for _, r in items)
    budget = max(1, min(CHUNK_ELEMENTS // vocab, -(-n_layers // 3) * widest))  # rows × layers
    windows = [RollingWindow(ctx.config.copy_window_k) for ctx, _ in items]
    groups: list[list[int]] = []
    width = 0
    for i, (_, rows) in enumerate(items):
        if groups and width + rows.shape[1] <= budget:
            groups[-1].append(i)
            width += rows.shape[1]
        else:
            groups.append([i])
            width = rows.shape[1]
    for group in groups:
        resids = torch.cat([items[i][1] for i in group], dim=1)
        ends = torch.tensor([items[i][1].shape[1] for i in group]).cumsum(0).tolist()
        spans = list(zip([0, *ends[:-1]], ends, strict=True))
        per_chunk = max(1, budget // resids.shape[1])
        for chunk in decoded_chunks(lens, resids, per_chunk=per_chunk, dtype=dtype, k=k):
            layers, logits, logp, entropy, top_p, top_ids = chunk
            last_top1 = top_ids[:, [b - 1 for _, b in spans], 0].tolist()
            for li, layer in enumerate(layers):
                for gi, (i, (a, b)) in enumerate(zip(group, spans, strict=True)):
                    yield i, LayerStep(
                        ctx=items[i][0], lens=lens.name, layer=layer, resid=items[i][1][layer],
                        logits=logits[li, a:b], logp=logp[li, a:b], entropy=entropy[li, a:b],
                        top_p=top_p[li, a:b], top_ids=top_ids[li, a:b],
                        window=windows[i].push(last_top1[li][gi]))
            del chunk, logits, logp, entropy, top_p, top_ids


def run_passes(analysis: Analysis, chunk: Sequence[tuple[Pass, Capture]], *,
               timer: StageTimer | None = None) -> list[PassResult]:
    """Run already-forwarded passes together; each result equals its ``Pass.run``.

    Every route of every pass is grouped by (lens, rows), and each group is
    decoded by ``decode_many``. ``timer`` gets ``breakdown/decode`` and
    ``breakdown/emit`` seconds.
    """
    prepared = []
    for p, cap in chunk:
        ids = p.token_ids(analysis)
        if cap.resids.shape[1] != len(ids):
            raise ValueError(f"capture has {cap.resids.shape[1]} positions, "
                             f"the prompt {len(ids)} tokens")
        prepared.append((p.context(analysis, cap, ids), cap, p.routes(analysis)))
    widest = max(cap.resids.shape[1] for _, cap, _ in prepared)  # one pass's positions
    sinks: list[list[list[Record]]] = [[[] for _ in routes] for _, _, routes in prepared]
    groups: dict[tuple[int, str], list[tuple[int, int]]] = {}
    lenses: dict[int, Lens] = {}
    for i, (_, _, routes) in enumerate(prepared):
        for j, r in enumerate(routes):
            groups.setdefault((id(r.lens), r.rows), []).append((i, j))
            lenses[id(r.lens)] = r.lens
    for (lens_id, rows), members in groups.items():
        items = [(prepared[i][0], prepared[i][1].resids if rows == "all"
                  else prepared[i][1].resids[:, -1:]) for i, _ in members]
        steps = decode_many(items, lenses[lens_id], widest=widest)
        for m, step in maybe_iterate(timer, "breakdown/decode", steps):
            i, j = members[m]
            r = prepared[i][2][j]
            with maybe_stage(timer, "breakdown/emit"):
                for emitter in r.emitters:
                    sinks[i][j].extend(emitter.emit(step))
            if analysis.progress is not None:
                analysis.progress(r.label, step.layer, analysis.model.n_layers)
            del step  # let decode_many free this chunk before decoding the next
    return [PassResult(ctx=ctx, records=tuple(rec for sink in sinks[i] for rec in sink),
                       capture=cap, non_finite_layer=first_non_finite_layer(cap))
            for i, (ctx, cap, _) in enumerate(prepared)]
