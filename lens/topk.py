"""``torch.topk`` of many long rows, exactly, through the maxima of blocks of each row.

On a CPU ``torch.topk(rows, k)`` copies every element of a row, with its
index, before it selects: SmolLM2's 49,152-token rows took 57 µs each, the
largest cost of a decode after the matmul and the log-softmax. Here a row's
top-k is looked for only in its ``k`` blocks (``BLOCK`` tokens each) with the
highest maxima, plus the tail the blocks do not cover: 640 candidates of
49,152 for ``k`` = 20. The answer is the answer only where it is unique:

- the top ``k + 1`` candidates are strictly decreasing (no tie within the
  top-k, nor at its edge), and
- the ``k``-th is above every block left out (the ``k + 1``-th block maximum),
  so nothing outside the candidates can reach the top-k.

Then ``torch.topk`` on the whole row has no choice to make: it returns the
same values and indices. Every other row (a tie, a NaN, an infinity) gets
``torch.topk`` on the whole row. So the result is ``torch.topk``'s, bit for
bit and index for index, whatever its order among ties; ``tests/test_topk.py``
checks it against ``torch.topk`` on random, tied and non-finite rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 32
"""Tokens per block. Smaller blocks mean fewer candidates but more maxima to rank:
on SmolLM2 (2 threads) 32 did a chunk's top-20 in 5.3 ms, 64 in 6.1, 128 in 5.9,
``torch.topk`` in 10.6-16."""


def blocked(vocab: int, k: int, device: torch.device) -> bool:
    """Whether rows of ``vocab`` go through block maxima: long CPU rows only.

    Short rows cost ``torch.topk`` little; a GPU's top-k does not copy.
    """
    return device.type == "cpu" and vocab >= 8 * (k + 1) * BLOCK


def maxima_columns(vocab: int) -> int:
    """Columns of ``block_maxima``'s result: the whole blocks of a row."""
    return vocab // BLOCK


def block_maxima(rows: Tensor, *, out: Tensor) -> Tensor:
    """(n, vocab) → ``out`` (n, vocab // BLOCK): the maximum of each whole block.

    A NaN is a block's maximum (``amax``), so a row with one is never taken
    as unique. Run it while the rows are in cache (after their log-softmax).
    """
    return torch.amax(_blocks(rows), dim=-1, out=out)


def _blocks(rows: Tensor) -> Tensor:
    """(n, vocab) rows, each a contiguous run → (n, vocab // BLOCK, BLOCK): their whole
    blocks, a view (no copy of a chunk when ``vocab`` is no multiple of ``BLOCK``)."""
    if rows.stride(-1) != 1:
        raise ValueError("top-k by blocks needs rows whose tokens are contiguous")
    return rows.as_strided((rows.shape[0], maxima_columns(rows.shape[1]), BLOCK),
                           (rows.stride(0), BLOCK, 1))


def topk_rows(rows: Tensor, k: int, maxima: Tensor, *, out: tuple[Tensor, Tensor]) -> int:
    """``torch.topk(rows, k, dim=-1, out=out)``, rows (n, vocab) contiguous, given
    their ``block_maxima``; values and indices land in ``out`` ((n, k) each).

    Returns how many rows had no unique top-k among the candidates (their
    top-k came from the whole row).
    """
    n, vocab = rows.shape
    columns = maxima_columns(vocab)
    whole = columns * BLOCK
    top_max, top_block = maxima.topk(k + 1, dim=-1)
    chosen = top_block[:, :k]
    # every block a row of one view: a window of BLOCK tokens at each offset of the rows
    windows = rows.as_strided(((n - 1) * rows.stride(0) + vocab - BLOCK + 1, BLOCK), (1, 1))
    starts = torch.arange(n, device=rows.device).unsqueeze(1) * rows.stride(0)
    candidates = windows.index_select(0, (chosen * BLOCK + starts).view(-1)).view(n, k * BLOCK)
    if whole < vocab:  # the tail no block covers: always a candidate
        candidates = torch.cat([candidates, rows[:, whole:]], dim=-1)
    values, at = candidates.topk(k + 1, dim=-1)
    in_block = at < k * BLOCK
    ids = torch.where(in_block,
                      chosen.gather(1, (at // BLOCK).clamp_max(k - 1)) * BLOCK + at % BLOCK,
                      at - k * BLOCK + whole)
    unique = ((values[:, :-1] > values[:, 1:]).all(dim=-1)
              & (values[:, k - 1] > top_max[:, k]) & values.isfinite().all(dim=-1))
    out[0].copy_(values[:, :k])
    out[1].copy_(ids[:, :k])
    if bool(unique.all()):
        return 0
    unsure = (~unique).nonzero().view(-1)
    v, i = rows.index_select(0, unsure).topk(k, dim=-1)
    out[0].index_copy_(0, unsure, v)
    out[1].index_copy_(0, unsure, i)
    return int(unsure.numel())
