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


def probs(logp: Tensor, *, out: Tensor | None = None) -> Tensor:
    """``exp(logp)`` for the sums of entropy and KL, fast where it matters.

    A probability below the dtype's smallest normal number (float32: e^-87.3,
    about 1e-38) is a denormal, and the CPU's exp takes 15-45× longer to make
    one: the last-position rows of deep layers, where nearly every token's
    log-probability is below -87, took 100 ms per chunk instead of 7. So
    log-probabilities below ``log(tiny) + 0.34`` (float32: -87) are taken
    there: such a p changes from under 1e-38 to 1.6e-38, a term ``p·log p``
    by under 2e-36, no entropy or KL a reader can see (identical float32
    sums in every chunk compared; float64's floor is -708, beyond any real
    log-probability). ``out`` (``logp``'s shape and dtype) receives the result.
    """
    floor = math.log(torch.finfo(logp.dtype).tiny) + 0.34
    if out is None or logp.requires_grad:  # out= refuses tensors that need grad
        return logp.clamp_min(floor).exp_()
    return torch.clamp(logp, min=floor, out=out).exp_()


def entropy_bits(logp: Tensor, *, scratch: Tensor | None = None) -> Tensor:
    """Shannon entropy in bits of each distribution (..., vocab) → (...).

    ``scratch`` (optional, at least ``logp.numel()`` elements of its dtype) holds
    the ``p·log p`` terms instead of a fresh tensor: reusing one buffer across
    chunks saves the page faults of a new allocation of that size each time.
    """
    out = None if scratch is None else scratch.view(-1)[:logp.numel()].view(logp.shape)
    terms = probs(logp, out=out)
    return (-_sum_where_p_positive(terms.mul_(logp), logp) / LN2).clamp_min(0.0)


def kl_bits(logp: Tensor, logq: Tensor, *, scratch: Tensor | None = None) -> Tensor:
    """KL(P ‖ Q) in bits, (..., vocab) → (...); terms with p = 0 contribute 0.

    ``scratch`` (optional, at least twice ``logp.numel()`` elements of its
    dtype) holds the terms and the probabilities instead of two fresh tensors:
    the same operations on the same numbers, so the same bits.
    """
    if scratch is None or logp.requires_grad:
        terms, p = logp - logq, probs(logp)
    else:
        n = logp.numel()
        terms = torch.sub(logp, logq, out=scratch.view(-1)[:n].view(logp.shape))
        p = probs(logp, out=scratch.view(-1)[n:2 * n].view(logp.shape))
    return (_sum_where_p_positive(terms.mul_(p), logp) / LN2).clamp_min(0.0)


def _sum_where_p_positive(terms: Tensor, logp: Tensor) -> Tensor:
    """Sum the ``p·f`` terms over the last dim, counting terms with p = 0 as 0.

    Where log p = −inf a term is ``nan`` or ``±inf`` (``probs`` floors p, so
    ``floor·(−inf)``); elsewhere a term whose p is 0 is (nearly) 0. So only
    rows whose plain sum is not finite can differ from the masked sum: they
    alone are summed again with the mask (an infinite KL stays infinite).
    Other rows need no masked copy of a layers × positions × vocab tensor.
    """
    total = row_sum(terms)
    bad = ~total.isfinite()
    if bool(bad.any()):
        total[bad] = torch.where(logp[bad].exp() > 0, terms[bad], 0.0).sum(dim=-1)
    return total


def _alone(t: Tensor) -> bool:
    """Whether a reduction of ``t`` over its last dimension gives one number.

    torch sums one long row in parts, one per thread, but each row of several
    whole: a row alone would round differently from the same row among others,
    and with the thread count.
    """
    return t.dim() > 0 and t.numel() == t.shape[-1] > 1


def _paired(t: Tensor) -> Tensor:
    """A single row ``t`` as the first of two rows (the second zeros): (2, len)."""
    out = t.new_zeros((2, t.shape[-1]))
    out[0] = t.reshape(-1)
    return out


def row_sum(t: Tensor) -> Tensor:
    """``t.sum(dim=-1)``, a single row summed as rows of several are (``_alone``).

    Every row's sum is then the same whether it is summed alone or among
    others, on one thread or several: the bits of a number do not depend on
    how many rows lens happened to reduce at once.
    """
    if _alone(t):
        return _paired(t).sum(dim=-1)[0].reshape(t.shape[:-1])
    return t.sum(dim=-1)


def answer_rank(logp: Tensor, answer_id: int) -> Tensor:
    """1 + #{tokens with probability strictly greater than the answer's}: (..., vocab) → (...)."""
    target = logp[..., answer_id].unsqueeze(-1)
    return 1 + (logp > target).sum(dim=-1)


COSINE_EPS = 1e-12


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity along the last dimension, the bits of torch's ``cosine_similarity``
    (``eps`` = ``COSINE_EPS``) but a single row's as in ``row_sum``."""
    return cosine_to_units(a.expand(torch.broadcast_shapes(a.shape, b.shape)), unit_rows(b))


def unit_rows(t: Tensor) -> Tensor:
    """``t`` over its rows' norms (at least ``COSINE_EPS``): ``cosine``'s second factor."""
    return t / row_norm(t).clamp_min_(COSINE_EPS).unsqueeze(-1)


def cosine_to_units(a: Tensor, units: Tensor, *, scratch: Tensor | None = None) -> Tensor:
    """``cosine(a, b)`` given ``units = unit_rows(b)``, bit for bit: b's norms once for
    many ``a`` (a layer's rows against the model's head).

    torch's ``cosine_similarity`` computes ``sum((a / |a|) · (b / |b|))``, norms
    at least ``eps``, each row's norm and sum whole: so does this, with the
    quotient in ``scratch`` (optional, ``a.numel()`` elements) instead of a
    fresh tensor; ``units`` must broadcast to ``a``'s shape.
    """
    norms = row_norm(a).clamp_min_(COSINE_EPS).unsqueeze(-1)
    out = None if scratch is None else scratch.view(-1)[:a.numel()].view(a.shape)
    quotient = torch.div(a, norms) if out is None else torch.div(a, norms, out=out)
    return row_sum(quotient.mul_(units))


def row_norm(t: Tensor) -> Tensor:
    """The 2-norm of each row (last dimension), a single row as in ``row_sum``."""
    if _alone(t):
        return torch.linalg.vector_norm(_paired(t), dim=-1)[0].reshape(t.shape[:-1])
    return torch.linalg.vector_norm(t, dim=-1)


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
