"""``lens.topk`` returns ``torch.topk``'s values and indices, bit for bit, on any rows."""

from __future__ import annotations

import pytest
import torch

from lens.topk import BLOCK, block_maxima, blocked, maxima_columns, topk_rows


def _topk(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    maxima = torch.empty(rows.shape[0], maxima_columns(rows.shape[1]), dtype=rows.dtype)
    block_maxima(rows, out=maxima)
    values = torch.empty(rows.shape[0], k, dtype=rows.dtype)
    ids = torch.empty(rows.shape[0], k, dtype=torch.long)
    whole_rows = topk_rows(rows, k, maxima, out=(values, ids))
    return values, ids, whole_rows


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def _assert_same(rows: torch.Tensor, k: int) -> int:
    """Same indices, and the same bits of every value (NaN and -0.0 included); returns
    how many rows took the whole-row path."""
    want = rows.topk(k, dim=-1)
    values, ids, whole_rows = _topk(rows, k)
    assert torch.equal(ids, want.indices)
    assert torch.equal(_bits(values), _bits(want.values))
    return whole_rows


@pytest.mark.parametrize("vocab", [49152, 32 * 400 + 17, 8 * 21 * BLOCK])
@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_log_probs_match_torch_topk(vocab, k, dtype):
    g = torch.Generator().manual_seed(vocab + k)
    scale = torch.tensor([0.1, 1.0, 3.0, 10.0, 30.0], dtype=dtype).repeat(4).unsqueeze(1)
    logits = torch.randn(len(scale), vocab, generator=g, dtype=dtype) * scale
    assert _assert_same(torch.log_softmax(logits, dim=-1), k) == 0  # candidates suffice


def test_ties_anywhere_fall_back_to_torch_topk_and_still_match():
    g = torch.Generator().manual_seed(0)
    vocab, k = 49152, 20
    rows = torch.log_softmax(torch.randn(12, vocab, generator=g) * 3, dim=-1)
    top = rows.max(dim=-1).values
    rows[0, [5, 40000]] = top[0] + 1  # a tie at the top
    rows[1, [7, 33, 900, 41000]] = top[1] + 1  # four equal, the top-k ordered among ties
    order = rows[2].argsort(descending=True)
    rows[2, order[k]] = rows[2, order[k - 1]]  # a tie at the edge of the top-k
    order = rows[3].argsort(descending=True)  # the k-th equals a left-out block's maximum
    outside = [i for i in range(vocab) if all(abs(i // BLOCK - j // BLOCK) > 0
                                              for j in order[:k].tolist())]
    rows[3, outside[0]] = rows[3, order[k - 1]]
    rows[4] = 0.0  # every token tied
    rows[5, ::BLOCK] = top[5] + 1  # every block's maximum tied
    rows[6, 100] = float("nan")
    rows[7, 3000] = float("inf")
    rows[8, :40000] = float("-inf")  # the top-k still unique: candidates suffice
    rows[9, : vocab - 10] = float("-inf")  # fewer finite tokens than k
    rows[10, 20000] = -0.0
    rows[10, 20001] = 0.0  # equal, though not the same bits
    assert _assert_same(rows, k) == 10  # every row but rows 8 and 11


def test_many_tokens_with_the_same_embedding_match():
    """Untrained tokens share an embedding, so their log-probs tie: rows made of a few values."""
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 6, (8, 49152), generator=g).float().neg()
    rows[:, 123] = 2.0
    assert _assert_same(rows, 20) == len(rows)


def test_blocks_are_used_for_long_cpu_rows_only():
    cpu = torch.device("cpu")
    assert blocked(49152, 20, cpu)
    assert not blocked(3000, 20, cpu)
    assert not blocked(49152, 20, torch.device("cuda"))
