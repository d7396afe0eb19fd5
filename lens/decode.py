"""Decoding: residual rows → logits, log-probs, entropy, top-k and the numbers records read.

Every route of every pass decodes through ``decode_many``: one pass alone
(``decode_steps``) or the rows of many passes side by side
(``lens.passes.run_passes``) go through the same chunks, so a batched run
gives the numbers of a pass alone. Per chunk, what the record emitters read
is computed for all of its layers and passes at once (``RowValues``,
``LastRow``): a few large tensor operations instead of a dozen small ones per
layer, pass and lens. On a many-fact probe the small ones cost more than the
matmul, most of all when OpenMP threads wait on busy cores.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from lens import metrics, topk
from lens.emitters import LastRow, LayerStep, PassContext, RowValues
from lens.lenses import Lens
from lens.rowgroups import Group, Rows, group_rows
from lens.steptensors import StepTensors
from lens.windows import RollingWindow

CHUNK_ELEMENTS = 1 << 25
"""Decode at most this many logits (layers × positions × vocab) per matmul."""
ROW_SLICE_ELEMENTS = 1 << 19
"""A chunk's log-softmax, entropy and top-k run on about this many logits at a time.

The matmul wants many rows at once (MKL's float32 unembedding of SmolLM2 ran
at 103 GFLOP/s with 153 rows, 150 with 272, on 2 threads), the row-wise work
after it wants rows that stay in cache: slices of 2 MB (float32) did a chunk's
log-softmax, entropy and top-k in 49 ms instead of 60 when run over the whole
chunk. Each of the three computes a row alone, so a row's numbers do not
depend on the slice it is in (``row_slices`` keeps the one exception out)."""
SLICE_ELEMENTS = 1 << 19
"""The last-position metrics work on at most this many logits at a time (their temporaries).

``last_rows``' four temporaries (``LAST_TEMPS``) live in the scratch of the
run's ``Workspace``, which holds its largest chunk's buffers through the
smaller decodes too. At 2^19 logits each (8 MB in float32 for the four) the
default run's peak stayed at 1.49× one pass's logits, and capitals' last
rows took 1.03 s instead of 1.47 s at 2^18 (each block's ~40 operations cost
more than its rows). Fresh temporaries of 2^20 logits each had once raised
the peak to 1.8×."""

DecodedChunk = tuple[list[int], Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
"""(layers, logits, log-probs, entropy, top-k p, top-k ids, finite logits); the last six
are (len(layers), rows, …)."""


class Workspace:
    """Decode buffers that outlive one ``decode_many`` call: one run's passes reuse them.

    A run decodes in many calls (each chunk of passes, each lens); a fresh
    buffer of ~100 MB for each cost 45-60 ms on CPU (the kernel's page faults
    on first touch and the unmap after), 1.4 s of a 24-fact probe. The buffer
    grows to the largest call's need and lives as long as its owner
    (``lens.passes.Analysis``: one model's run; ``release`` frees it when the
    passes are done). A call made while another holds the buffer (a decode
    inside an emitter) gets a buffer of its own.
    """

    def __init__(self) -> None:
        self._buffer: Tensor | None = None
        self._busy = False

    def release(self) -> None:
        """Free the buffer (a run's passes are done: what follows need not hold it)."""
        if not self._busy:
            self._buffer = None

    @contextmanager
    def borrow(self, numel: int, dtype: torch.dtype, device: torch.device) -> Iterator[Tensor]:
        """A flat tensor of ``numel`` elements, this workspace's while the block runs."""
        if self._busy:
            yield torch.empty(numel, dtype=dtype, device=device)
            return
        buffer = self._buffer
        if (buffer is None or buffer.numel() < numel or buffer.dtype != dtype
                or buffer.device != device):
            self._buffer = buffer = None  # the old one goes before the new one comes
            buffer = self._buffer = torch.empty(numel, dtype=dtype, device=device)
        self._busy = True
        try:
            yield buffer[:numel]
        finally:
            self._busy = False


def decoded_chunks(lens: Lens, resids: Tensor, *, per_chunk: int, k: int,
                   buffers: Tensor, scratch: Tensor) -> Iterator[DecodedChunk]:
    """Decode (n_layers, rows, d_model) residuals ``per_chunk`` layers per matmul.

    The logits and log-probabilities of every chunk go into ``buffers`` (2, ≥
    one chunk's logits, the analysis dtype), the entropy's terms of a slice of
    rows into ``scratch`` (``2 · slice_rows(vocab) − 1`` rows, or the chunk's
    if fewer): a fresh tensor of a chunk's size (tens of MB) costs the
    kernel's page faults every time, 10-15 ms each on CPU, which on a
    many-fact probe added seconds. A chunk's tensors are therefore valid until
    the next chunk is decoded. Long CPU rows get their top-k from the maxima of
    their blocks (``lens.topk``: ``torch.topk``'s result, in half the time),
    taken slice by slice while the slice is in cache.
    """
    n_layers, rows = resids.shape[:2]
    vocab = lens.unembed.d_vocab
    by_blocks = topk.blocked(vocab, k, buffers.device)
    for start in range(0, n_layers, per_chunk):
        layers = list(range(start, min(n_layers, start + per_chunk)))
        shape = (len(layers), rows, vocab)
        size = len(layers) * rows * vocab
        # the unembedding's dtype is the analysis dtype (lens.unembed): no cast, no copy
        logits = lens.decode(resids[layers[0]:layers[-1] + 1], layers,
                             out=buffers[0, :size].view(shape))
        logp = buffers[1, :size].view(shape)
        z, lp = logits.view(-1, vocab), logp.view(-1, vocab)
        entropy = torch.empty(shape[:2], dtype=logp.dtype, device=logp.device)
        top_logp = torch.empty((*shape[:2], k), dtype=logp.dtype, device=logp.device)
        top_ids = torch.empty((*shape[:2], k), dtype=torch.long, device=logp.device)
        finite = torch.empty(shape[:2], dtype=torch.bool, device=logp.device)
        flat_h, flat_v, flat_i = entropy.view(-1), top_logp.view(-1, k), top_ids.view(-1, k)
        maxima = (torch.empty(len(lp), topk.maxima_columns(vocab), dtype=lp.dtype, device=lp.device)
                  if by_blocks else None)
        for a, b in row_slices(len(layers) * rows, slice_rows(vocab)):
            torch.log_softmax(z[a:b], dim=-1, out=lp[a:b])
            finite.view(-1)[a:b] = finite_rows(z[a:b])  # while the slice is in cache
            flat_h[a:b] = metrics.entropy_bits(lp[a:b], scratch=scratch)
            if maxima is None:
                torch.topk(lp[a:b], k, dim=-1, out=(flat_v[a:b], flat_i[a:b]))
            else:
                topk.block_maxima(lp[a:b], out=maxima[a:b])
        if maxima is not None:
            topk.topk_rows(lp, k, maxima, out=(flat_v, flat_i))
        yield layers, logits, logp, entropy, top_logp.exp_(), top_ids, finite
        del logits, logp, entropy, top_logp, top_ids, finite


def slice_rows(vocab: int) -> int:
    """Rows per slice of a chunk's row-wise work: ``ROW_SLICE_ELEMENTS`` logits, at least 2."""
    return max(2, ROW_SLICE_ELEMENTS // max(1, vocab))


def row_slices(n_rows: int, per: int) -> list[tuple[int, int]]:
    """``[a, b)`` slices covering ``n_rows``: ``per`` to ``2·per − 1`` rows each (all of
    them in one when fewer).

    Never a single row out of several: torch sums one long row (a reduction to
    one number) in parts, one per thread, but each row of several whole, so a
    row's entropy alone differs in the last bit from the same row among others.
    """
    n = max(1, n_rows // max(2, per))
    edges = [n_rows * i // n for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def as_lists(t: Tensor) -> list:  # type: ignore[type-arg]
    """``t.tolist()`` through numpy: several times faster for int64 (bool, fp32/fp64 alike)."""
    return t.detach().cpu().numpy().tolist()  # type: ignore[no-any-return]


def finite_rows(logits: Tensor) -> Tensor:
    """(..., vocab) → (...): whether every logit of a row is finite.

    A row's sum is finite exactly when its terms are, unless finite terms
    overflow: only rows whose sum is not finite are checked element by element.
    """
    finite = logits.sum(dim=-1).isfinite()
    if not bool(finite.all()):
        suspect = ~finite
        finite[suspect] = logits[suspect].isfinite().all(dim=-1)
    return finite


def last_rows(ctxs: Sequence[PassContext], logits: Tensor, logp: Tensor,
              lasts: Sequence[int], top_ids: Tensor | None = None, *,
              scratch: Tensor | None = None) -> list[list[LastRow]]:
    """The last-position numbers of every layer × pass of a chunk: ``[layer][pass]``.

    Args:
        ctxs: The passes, one per entry of ``lasts``.
        logits, logp: (layers, rows, vocab) the chunk.
        lasts: Row of each pass's last position in the chunk.
        top_ids: (layers, rows, k ≥ 2) the chunk's top-k ids, when decoded: a row's
            top-1 is its first unless the first two tie (``argmax`` takes the
            lowest id of a tie, top-k need not) or the row is not finite;
            otherwise, and without them, ``argmax`` finds it (a pass over the row).
        scratch: Room for the temporaries (the analysis dtype, at least
            ``LAST_TEMPS`` rows), else they are made here. Rows are worked on
            in blocks of ``scratch.numel() // LAST_TEMPS`` logits, at most
            ``SLICE_ELEMENTS``: a fresh tensor for each block's temporaries
            cost the kernel's page faults, a third of this function's time on a
            many-fact probe.

    A row whose log-probs are not all finite gets ``finite=False`` (its other
    numbers mean nothing), as ``lens.emitters.scalars`` would say of it. Every
    number of a row is computed from that row alone, a lone row's sums as
    rows of several are (``metrics.row_sum``): so it does not depend on the
    blocks, the chunking or the thread count. The head's side of the cosine
    is computed once per call (``metrics.unit_rows``), not once per layer.
    """
    n_layers, n_rows, vocab = logp.shape
    device, n_passes = logp.device, len(ctxs)
    every = list(lasts) == list(range(n_rows))  # a chunk of last rows only: no gathered copy
    rows_of = (torch.arange(n_layers, device=device).unsqueeze(1) * n_rows
               + torch.tensor(list(lasts), device=device))  # (layer, pass) → row of the chunk
    head_logp = torch.stack([c.head_logp for c in ctxs]).to(device=device, dtype=logp.dtype)
    head_units = metrics.unit_rows(
        torch.stack([c.head_logits for c in ctxs]).to(device=device, dtype=logits.dtype))
    ids = torch.tensor([[c.gold.first_id or 0, c.contrast_first_id or 0] for c in ctxs],
                       device=device)
    block = min(SLICE_ELEMENTS, n_layers * n_passes * vocab) // vocab  # rows per block
    usable = scratch is not None and scratch.dtype == logp.dtype and scratch.device == device
    if usable:
        assert scratch is not None
        block = min(block, scratch.numel() // (LAST_TEMPS * vocab))
    if not usable or block < 1:
        block = max(1, block)
        scratch = torch.empty(LAST_TEMPS * block * vocab, dtype=logp.dtype, device=device)
    shape = (n_layers, n_passes)
    ok = torch.empty(shape, dtype=torch.bool, device=device)
    top1 = torch.empty(shape, dtype=torch.long, device=device)
    rank = torch.empty(shape, dtype=torch.long, device=device)
    probs3, kl, cos = (torch.empty((*shape, n), dtype=logp.dtype, device=device)
                       for n in (3, 1, 1))
    k = top_ids.shape[-1] if top_ids is not None else 0
    for s, e, a, b in _last_blocks(n_layers, n_passes, block):
        at = (slice(s, e), slice(a, b))
        here = (e - s, b - a, vocab)
        temps = scratch[:LAST_TEMPS * (e - s) * (b - a) * vocab].view(LAST_TEMPS, *here)
        rows = rows_of[at].reshape(-1)
        if every:
            lp, z = logp[s:e, a:b], logits[s:e, a:b]
        else:
            lp = torch.index_select(logp.view(-1, vocab), 0, rows,
                                    out=temps[2].view(-1, vocab)).view(here)
            z = torch.index_select(logits.view(-1, vocab), 0, rows,
                                   out=temps[3].view(-1, vocab)).view(here)
        ok[at] = finite_rows(lp)
        if k >= 2:
            assert top_ids is not None
            first = top_ids.view(-1, k)[rows, :2].view(*here[:2], 2)
            two = lp.gather(-1, first)
            best = first[..., :1].clone()
            unsure = (two[..., 0] == two[..., 1]) | ~ok[at]
            if bool(unsure.any()):
                best[unsure] = lp[unsure].argmax(dim=-1, keepdim=True)
        else:
            best = lp.argmax(dim=-1, keepdim=True)
        top1[at] = best[..., 0]
        picked = lp.gather(-1, torch.cat([best, ids[a:b].expand(*here[:2], 2)], dim=-1))
        probs3[at] = picked.exp()
        # counted as floats (1.0 per token above the answer: exact below 2^24 tokens): a
        # bool tensor's sum first copies it to int64, 8 bytes per token
        rank[at] = 1 + metrics.row_sum(torch.gt(lp, picked[..., 1:2], out=temps[0])).long()
        kl[at] = metrics.kl_bits(lp, head_logp[a:b], scratch=temps[:2]).unsqueeze(-1)
        cos[at] = metrics.cosine_to_units(z, head_units[a:b], scratch=temps[0]).unsqueeze(-1)
    ok_l, top1_l, rank_l = as_lists(ok), as_lists(top1), as_lists(rank)
    p_l, kl_l, cos_l = as_lists(probs3), as_lists(kl), as_lists(cos)
    return [[LastRow(finite=ok_l[li][g], top1_id=top1_l[li][g], p_top1=p_l[li][g][0],
                     p_answer=p_l[li][g][1] if c.gold.first_id is not None else None,
                     rank=rank_l[li][g] if c.gold.first_id is not None else None,
                     kl_bits=kl_l[li][g][0], cosine=cos_l[li][g][0],
                     p_contrast=p_l[li][g][2] if c.contrast_first_id is not None else None)
             for g, c in enumerate(ctxs)] for li in range(n_layers)]


LAST_TEMPS = 4
"""A block's temporaries in ``last_rows``: the KL's terms and probabilities (the rank's
and the cosine's reuse the first), the gathered log-probs and logits."""


def _last_blocks(n_layers: int, n_passes: int, rows: int) -> list[tuple[int, int, int, int]]:
    """``last_rows``' blocks ``(first layer, end layer, first pass, end pass)`` of at most
    ``rows`` rows, as even as they come: whole layers when a layer's passes fit, else
    each layer's passes in parts."""
    if n_passes <= rows:
        return [(s, e, 0, n_passes) for s, e in _even(n_layers, rows // n_passes)]
    return [(layer, layer + 1, a, b) for layer in range(n_layers)
            for a, b in _even(n_passes, rows)]


def _even(n: int, most: int) -> list[tuple[int, int]]:
    """``[a, b)`` ranges covering ``n`` in as few parts of at most ``most`` as can be, even."""
    parts = -(-n // most)
    edges = [n * i // parts for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def decode_many(items: Sequence[tuple[PassContext, Tensor]], lens: Lens, *,
                widest: int | None = None, workspace: Workspace | None = None,
                aliases: Sequence[tuple[PassContext, int]] = ()
                ) -> Iterator[tuple[int, LayerStep]]:
    """Decode several passes' rows with shared matmuls; yield ``(item index, step)``.

    Each item is a pass context and its residual rows ``(n_layers + 1, rows_i,
    d_model)``; every item's steps come in layer order. Items are grouped so
    that one layer of a group fits the budget, a prompt prefix that items of
    a group share decoded once (``lens.rowgroups``), then each group is
    decoded in chunks of layers. A chunk holds at most the logits of half the layers of
    one pass of ``widest`` positions (default: the widest item; and at most
    ``CHUNK_ELEMENTS``): its working set (logits and log-probs, plus a slice's
    entropy terms) stays within one pass's full logits; they live in one
    buffer reused for every chunk, ``workspace``'s (a run's calls share it) or
    made for this call. A step's tensors come from it (views, or copies of a
    shared prefix's rows, made when read: ``lens.steptensors``): valid until
    the consumer asks for a step of the next chunk (emitters turn them into
    plain values at once).

    ``aliases`` are passes that read only the last row of an item's residuals
    (``(context, item index)``: a prompt that recurs, a fact's control that is
    another fact's prompt): they get that row's steps, numbered ``len(items) +
    k``, with their own answer's numbers and copy window, and no matmul of
    their own. A row's numbers do not depend on the rows decoded beside it
    (``row_slices``; MKL's float32 matmul gave a row the same bits in every
    matmul of 12 rows or more), so an alias's steps, and a shared row's
    numbers, are those a decode of its own would give.
    """
    if not items:
        return
    n_layers = items[0][1].shape[0]
    vocab = lens.unembed.d_vocab
    dtype = items[0][0].head_logp.dtype
    config = items[0][0].config
    k = min(max(config.topk_verbose, config.topk_brief), vocab)
    widest = widest or max(r.shape[1] for _, r in items)
    budget = max(1, min(CHUNK_ELEMENTS // vocab, -(-n_layers // 2) * widest))  # rows × layers
    groups = group_rows(items, budget)
    chunk_layers = [min(n_layers, max(1, budget // max(1, g.width))) for g in groups]
    size = max(n * g.width for n, g in zip(chunk_layers, groups, strict=True)) * vocab
    scratch = max(min(2 * slice_rows(vocab) - 1, size // vocab) * vocab,  # row_slices' widest
                  min(LAST_TEMPS * SLICE_ELEMENTS, size))  # last_rows' blocks
    with (workspace or Workspace()).borrow(2 * size + scratch, dtype, items[0][1].device) as flat:
        yield from _decode_groups(items, aliases, lens, groups, chunk_layers,
                                  flat[:2 * size].view(2, size), flat[2 * size:], k)


def _decode_groups(items: Sequence[tuple[PassContext, Tensor]],
                   aliases: Sequence[tuple[PassContext, int]], lens: Lens,
                   groups: Sequence[Group], chunk_layers: Sequence[int],
                   buffers: Tensor, scratch: Tensor, k: int) -> Iterator[tuple[int, LayerStep]]:
    """``decode_many``'s loop: each group of items (and their aliases) in chunks of layers,
    into ``buffers``."""
    windows = [RollingWindow(ctx.config.copy_window_k) for ctx, _ in (*items, *aliases)]
    for group, per_chunk in zip(groups, chunk_layers, strict=True):
        # (yield index, context, the item whose rows it reads, that item's place in group)
        readers = [(i, items[i][0], i, g) for g, i in enumerate(group.members)]
        readers += [(len(items) + a, ctx, i, g) for g, i in enumerate(group.members)
                    for a, (ctx, source) in enumerate(aliases) if source == i]
        ctxs = [ctx for _, ctx, _, _ in readers]
        lasts = [group.last(g) for *_, g in readers]
        for chunk in decoded_chunks(lens, group.resids(items), per_chunk=per_chunk, k=k,
                                    buffers=buffers, scratch=scratch):
            layers, logits, logp, entropy, top_p, top_ids, finite = chunk
            last = last_rows(ctxs, logits, logp, lasts, top_ids, scratch=scratch)
            lists = [as_lists(t) for t in (finite, entropy, top_ids, top_p)]
            for li, layer in enumerate(layers):
                decoded = (logits[li], logp[li], entropy[li], top_p[li], top_ids[li])
                ok, ent, ids, ps = (x[li] for x in lists)
                for r, (index, ctx, i, g) in enumerate(readers):
                    resid = items[i][1][layer]
                    if index == i:
                        rows, own = group.rows[g], slice(None)
                    else:  # an alias: the item's last row
                        rows, own = slice(lasts[r], lasts[r] + 1), slice(len(resid) - 1, None)
                    yield index, LayerStep(
                        ctx=ctx, lens=lens.name, layer=layer,
                        tensors=StepTensors(decoded, rows, resid, own),
                        window=windows[index].push(ids[lasts[r]][0]),
                        values=_row_values(rows, ok, ent, ids, ps),
                        last=last[li][r])
            del chunk, logits, logp, entropy, top_p, top_ids, finite, decoded


def _row_values(rows: Rows, finite: list[Any], entropy: list[Any], top_ids: list[Any],
                top_p: list[Any]) -> RowValues:
    """The chunk's per-row values (one layer's lists) of a step's rows."""
    if isinstance(rows, slice):
        return RowValues(finite=finite[rows], entropy=entropy[rows], top_ids=top_ids[rows],
                         top_p=top_p[rows])
    return RowValues(finite=[finite[r] for r in rows], entropy=[entropy[r] for r in rows],
                     top_ids=[top_ids[r] for r in rows], top_p=[top_p[r] for r in rows])


def decode_steps(ctx: PassContext, lens: Lens, resids: Tensor) -> Iterator[LayerStep]:
    """One pass's rows decoded alone, a step per layer (``decode_many`` of one item)."""
    for _, step in decode_many([(ctx, resids)], lens):
        yield step
        del step  # hold no view of this chunk while the next one is decoded
