"""Pure tensor → number functions. Batched over leading dimensions.

Inputs are log-probabilities from ``log_softmax`` in the analysis dtype, so
``0·log 0`` terms are handled exactly instead of through ``log(p + eps)``.
"""

from __future__ import annotations

import math
import string
import unicodedata
from collections.abc import Sequence

import torch
from torch import Tensor

LN2 = math.log(2.0)
_PUNCT = set(string.punctuation)


def log_probs(logits: Tensor, dtype: torch.dtype) -> Tensor:
    """(..., vocab) logits → log-softmax in ``dtype``."""
    return torch.log_softmax(logits.to(dtype), dim=-1)


def entropy_bits(logp: Tensor, *, scratch: Tensor | None = None) -> Tensor:
    """Shannon entropy in bits of each distribution (..., vocab) → (...).

    ``scratch`` (optional, at least ``logp.numel()`` elements of its dtype) holds
    the ``p·log p`` terms instead of a fresh tensor: reusing one buffer across
    chunks saves the page faults of a new allocation of that size each time.
    """
    if scratch is None or logp.requires_grad:  # out= refuses tensors that need grad
        terms = logp.exp()
    else:
        terms = torch.exp(logp, out=scratch.view(-1)[:logp.numel()].view(logp.shape))
    return (-_sum_where_p_positive(terms.mul_(logp), logp) / LN2).clamp_min(0.0)


def kl_bits(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(P ‖ Q) in bits, (..., vocab) → (...); terms with p = 0 contribute 0."""
    return (_sum_where_p_positive((logp - logq).mul_(logp.exp()), logp) / LN2).clamp_min(0.0)


def _sum_where_p_positive(terms: Tensor, logp: Tensor) -> Tensor:
    """Sum the ``p·f`` terms over the last dim, counting terms with p = 0 as 0.

    A term with p = 0 is ``0·(±inf) = nan`` where log p = −inf and ±0 otherwise,
    so only rows whose plain sum is nan can differ from the masked sum: they
    alone are summed again with the mask. Other rows give the masked sum bit
    for bit, without a masked copy of a layers × positions × vocab tensor.
    """
    total = terms.sum(dim=-1)
    bad = total.isnan()
    if bool(bad.any()):
        total[bad] = torch.where(logp[bad].exp() > 0, terms[bad], 0.0).sum(dim=-1)
    return total


def answer_rank(logp: Tensor, answer_id: int) -> Tensor:
    """1 + #{tokens with probability strictly greater than the answer's}: (..., vocab) → (...)."""
    target = logp[..., answer_id].unsqueeze(-1)
    return 1 + (logp > target).sum(dim=-1)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity along the last dimension."""
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)


def is_contiguous_subsequence(window: Sequence[int], context: Sequence[int]) -> bool:
    """Whether ``window`` occurs as a contiguous run inside ``context``."""
    k = len(window)
    if k == 0 or k > len(context):
        return False
    w = list(window)
    return any(list(context[i:i + k]) == w for i in range(len(context) - k + 1))


def is_blank_or_punct(text: str) -> bool:
    """True when a token decodes to only whitespace and/or punctuation (any script)."""
    return all(ch.isspace() or ch in _PUNCT or unicodedata.category(ch).startswith("P")
               for ch in text)


def copy_collapse(
    window: Sequence[int], context_ids: Sequence[int], *, p_top1: float, p_top2: float,
    top1_text: str, threshold: float, margin: float, k: int,
) -> bool:
    """The copy rule (docs/outputs.md) on a full window of the last ``k`` top-1 ids."""
    return (
        len(window) == k
        and is_contiguous_subsequence(window, context_ids)
        and p_top1 > threshold
        and p_top1 - p_top2 > margin
        and not is_blank_or_punct(top1_text)
    )


ABS_DECIMALS = 12


def settle(x: float) -> float:
    """Round a difference-of-nearly-equal-numbers result to 1e-12 absolute.

    KL divergences, rest mass and margins cancel large terms, so their last
    bits vary with the CPU kernel even in float64; relative digits of such a
    tiny number are noise. Rounding to a fixed absolute grid keeps outputs
    byte-stable without hiding anything a reader could use.
    """
    return round(float(x), ABS_DECIMALS) + 0.0
