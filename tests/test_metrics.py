"""Tests for lens.metrics: entropy, KL, rank, cosine, the copy rule and ``settle``."""

from __future__ import annotations

import math
import string

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lens import metrics
from lens.metrics import (
    answer_rank,
    copy_collapse,
    cosine,
    entropy_bits,
    is_blank_or_punct,
    is_contiguous_subsequence,
    kl_bits,
    log_probs,
    settle,
)

FAST = settings(max_examples=60, deadline=None)
DTYPES = [torch.float32, torch.float64]
# Bound slack: float32 sums of V terms carry a few ulps of error.
SLACK = {torch.float32: 1e-5, torch.float64: 1e-12}


def logit_arrays(min_vocab: int = 1, max_vocab: int = 40, rows: int = 3, bound: float = 60.0):
    """(rows, V) float64 logit arrays with finite entries."""
    return st.integers(min_vocab, max_vocab).flatmap(
        lambda v: hnp.arrays(np.float64, (rows, v),
                             elements=st.floats(-bound, bound, allow_nan=False, width=64))
    )


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


# --------------------------------------------------------------------------- log_probs


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_probs_is_normalised_in_requested_dtype(dtype):
    z = torch.randn(2, 3, 17, dtype=torch.float16)
    lp = log_probs(z, dtype)
    assert lp.dtype == dtype
    assert lp.shape == z.shape
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2, 3, dtype=dtype))


# --------------------------------------------------------------------------- entropy


@pytest.mark.parametrize("dtype", DTYPES)
@FAST
@given(z=logit_arrays())
@example(z=np.zeros((3, 1)))
@example(z=np.array([[60.0, -60.0, 0.0]] * 3))
def test_entropy_within_zero_and_log2_vocab(dtype, z):
    v = z.shape[-1]
    h = entropy_bits(log_probs(torch.from_numpy(z), dtype))
    assert h.shape == (z.shape[0],)
    assert h.dtype == dtype
    assert torch.isfinite(h).all()
    assert (h >= 0).all()
    assert (h <= math.log2(v) + SLACK[dtype]).all()


@FAST
@given(z=logit_arrays(bound=30.0))
def test_entropy_matches_numpy_reference(z):
    lp = np_log_softmax(z)
    ref = -(np.exp(lp) * lp).sum(-1) / math.log(2)
    got = entropy_bits(log_probs(torch.from_numpy(z), torch.float64)).numpy()
    np.testing.assert_allclose(got, np.maximum(ref, 0.0), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [1, 2, 7, 50, 1000])
@pytest.mark.parametrize("level", [0.0, -13.5, 1e4])
def test_entropy_of_uniform_is_log2_vocab(dtype, v, level):
    z = torch.full((2, v), level, dtype=dtype)
    h = entropy_bits(log_probs(z, dtype))
    torch.testing.assert_close(h, torch.full((2,), math.log2(v), dtype=dtype),
                               rtol=0, atol=SLACK[dtype] * max(1.0, math.log2(v)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v,hot", [(1, 0), (5, 0), (5, 4), (64, 31)])
def test_entropy_of_one_hot_is_exactly_zero(dtype, v, hot):
    z = torch.full((v,), -math.inf, dtype=dtype)
    z[hot] = 3.0
    h = entropy_bits(log_probs(z, dtype))
    assert not torch.isnan(h)
    assert h.item() == 0.0


def test_entropy_two_equal_outcomes_is_one_bit_and_ignores_minus_inf():
    z = torch.tensor([1.0, -math.inf, 1.0, -math.inf], dtype=torch.float64)
    assert entropy_bits(log_probs(z, torch.float64)).item() == pytest.approx(1.0, abs=1e-15)


def test_entropy_is_batched_over_leading_dims():
    z = torch.randn(2, 3, 11, dtype=torch.float64)
    h = entropy_bits(log_probs(z, torch.float64))
    assert h.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert h[i, j] == entropy_bits(log_probs(z[i, j], torch.float64))


# --------------------------------------------------------------------------- KL


@st.composite
def logit_pairs(draw, bound: float = 30.0):
    v = draw(st.integers(1, 40))
    elems = st.floats(-bound, bound, allow_nan=False, width=64)
    return (draw(hnp.arrays(np.float64, (2, v), elements=elems)),
            draw(hnp.arrays(np.float64, (2, v), elements=elems)))


@pytest.mark.parametrize("dtype", DTYPES)
@FAST
@given(pair=logit_pairs())
def test_kl_is_non_negative_and_finite(dtype, pair):
    zp, zq = pair
    kl = kl_bits(log_probs(torch.from_numpy(zp), dtype), log_probs(torch.from_numpy(zq), dtype))
    assert kl.shape == (2,)
    assert kl.dtype == dtype
    assert torch.isfinite(kl).all()
    assert (kl >= 0).all()


@FAST
@given(z=logit_arrays(bound=30.0), shift=st.floats(-100, 100, allow_nan=False))
@example(z=np.zeros((3, 1)), shift=0.0)
def test_kl_of_equal_distributions_is_zero_in_float64(z, shift):
    lp = log_probs(torch.from_numpy(z), torch.float64)
    assert (kl_bits(lp, lp) == 0).all()
    # The same distribution from shifted logits: equal up to rounding.
    lq = log_probs(torch.from_numpy(z + shift), torch.float64)
    assert (kl_bits(lp, lq).abs() <= 1e-12).all()


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), shift=st.sampled_from([0.5, 3.7, -11.0]))
def test_kl_of_nearly_equal_distributions_never_goes_negative(dtype, seed, shift):
    # Rounding makes the raw sum slightly negative for (almost) equal P and Q.
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(8, 30, generator=gen, dtype=torch.float64) * 5
    kl = kl_bits(log_probs(z, dtype), log_probs(z + shift, dtype))
    assert (kl >= 0).all()
    assert (kl <= SLACK[dtype] * 10).all()


@FAST
@given(pair=logit_pairs())
@example(pair=(np.array([[0.0, 0.0], [5.0, -5.0]]), np.array([[10.0, -10.0], [-5.0, 5.0]])))
def test_kl_matches_numpy_in_bits(pair):
    zp, zq = pair
    lp, lq = np_log_softmax(zp), np_log_softmax(zq)
    ref = (np.exp(lp) * (lp - lq)).sum(-1) / math.log(2)
    got = kl_bits(log_probs(torch.from_numpy(zp), torch.float64),
                  log_probs(torch.from_numpy(zq), torch.float64)).numpy()
    np.testing.assert_allclose(got, np.maximum(ref, 0.0), rtol=1e-9, atol=1e-12)


def test_kl_known_value_in_bits():
    # P = (1/2, 1/2), Q = (1/4, 3/4): KL = 1/2 log2(2) + 1/2 log2(2/3).
    lp = torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))
    lq = torch.log(torch.tensor([0.25, 0.75], dtype=torch.float64))
    expected = 0.5 * math.log2(2.0) + 0.5 * math.log2(0.5 / 0.75)
    assert kl_bits(lp, lq).item() == pytest.approx(expected, rel=1e-14)
    assert kl_bits(lq, lp).item() != pytest.approx(expected, rel=1e-3)  # not symmetric


def test_kl_ignores_outcomes_impossible_under_p():
    # p = 0 where q > 0 contributes nothing (no 0 * -inf = nan).
    lp = log_probs(torch.tensor([0.0, -math.inf, 0.0], dtype=torch.float64), torch.float64)
    lq = log_probs(torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64), torch.float64)
    assert kl_bits(lp, lq).item() == pytest.approx(math.log2(3 / 2), rel=1e-14)


# --------------------------------------------------------------------------- rank


def ref_rank(logp_row: np.ndarray, answer: int) -> int:
    return 1 + sum(1 for x in logp_row if x > logp_row[answer])


@st.composite
def tied_logits(draw):
    """Logits from a tiny set of integers, so ties are common."""
    v = draw(st.integers(1, 30))
    z = draw(hnp.arrays(np.float64, (v,), elements=st.integers(-3, 3).map(float)))
    return z, draw(st.integers(0, v - 1))


@pytest.mark.parametrize("dtype", DTYPES)
@FAST
@given(case=tied_logits())
@example(case=(np.zeros(5), 2))
@example(case=(np.array([3.0, 1.0, 3.0, 1.0]), 1))
def test_answer_rank_counts_strictly_greater(dtype, case):
    z, answer = case
    v = z.shape[0]
    lp = log_probs(torch.from_numpy(z), dtype)
    rank = int(answer_rank(lp, answer))
    assert 1 <= rank <= v
    assert rank == ref_rank(lp.numpy(), answer)
    # Equal logits give equal ranks; a strict maximum ranks 1.
    assert rank == ref_rank(z, answer)
    if z[answer] == z.max():
        assert rank == 1


def test_answer_rank_extremes_and_ties():
    lp = log_probs(torch.tensor([0.5, 2.0, -1.0, 2.0, 0.0]), torch.float32)
    assert int(answer_rank(lp, 1)) == 1  # tied argmax: nobody is strictly greater
    assert int(answer_rank(lp, 3)) == 1
    assert int(answer_rank(lp, 0)) == 3
    assert int(answer_rank(lp, 2)) == 5  # unique minimum ranks V
    uniform = log_probs(torch.zeros(7), torch.float32)
    assert all(int(answer_rank(uniform, i)) == 1 for i in range(7))


def test_answer_rank_is_batched():
    z = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    ranks = answer_rank(log_probs(z, torch.float32), 0)
    assert ranks.tolist() == [3, 1]


# --------------------------------------------------------------------------- cosine


@pytest.mark.parametrize("dtype", DTYPES)
@FAST
@given(a=hnp.arrays(np.float64, st.integers(1, 50),
                    elements=st.floats(-1e3, 1e3, allow_nan=False)),
       c=st.floats(1e-3, 1e3))
def test_cosine_of_a_vector_with_itself_is_one(dtype, a, c):
    if np.abs(a).max() < 1e-3:
        a = a + 1.0
    t = torch.from_numpy(a).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert cosine(t, t).item() == pytest.approx(1.0, abs=tol)
    assert cosine(t, c * t).item() == pytest.approx(1.0, abs=tol)
    assert cosine(t, -t).item() == pytest.approx(-1.0, abs=tol)


def test_cosine_orthogonal_and_batched():
    a = torch.tensor([[1.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    got = cosine(a, b)
    assert got.shape == (2,)
    torch.testing.assert_close(got, torch.tensor([0.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape_a", "shape_b"), [((4, 49_152), (4, 49_152)),
                                                  ((5, 6, 4_000), (6, 4_000)),
                                                  ((3, 1, 49_152), (1, 49_152))])
def test_cosine_has_the_bits_of_torchs_cosine_similarity(dtype, shape_a, shape_b):
    """``cosine`` and ``cosine_to_units`` (the head's factor computed once) reproduce
    torch's formula bit for bit, a scratch buffer or not, on 1 and 2 threads."""
    from lens.metrics import COSINE_EPS, cosine, cosine_to_units, unit_rows

    gen = torch.Generator().manual_seed(len(shape_a))
    a = torch.randn(*shape_a, generator=gen, dtype=dtype) * 7
    b = torch.randn(*shape_b, generator=gen, dtype=dtype) * 3
    threads = torch.get_num_threads()
    try:
        for n in (2, 1):
            torch.set_num_threads(n)
            want = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=COSINE_EPS)
            assert torch.equal(cosine(a, b), want)
            scratch = torch.empty(a.numel() + 3, dtype=dtype)
            assert torch.equal(cosine_to_units(a, unit_rows(b), scratch=scratch), want)
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- subsequences


def ref_contiguous(window: list[int], context: list[int]) -> bool:
    slices = {tuple(context[i:j]) for i in range(len(context)) for j in range(i + 1, len(context) + 1)}
    return tuple(window) in slices


small_ids = st.lists(st.integers(0, 3), max_size=8)


@settings(max_examples=300, deadline=None)
@given(window=small_ids, context=small_ids)
@example(window=[], context=[1, 2])
@example(window=[1, 3], context=[1, 2, 3])  # a subsequence, but not a contiguous one
@example(window=[2, 3], context=[1, 2, 3])
@example(window=[1, 2, 3], context=[1, 2, 3])
@example(window=[1, 2, 3, 4], context=[1, 2, 3])
def test_is_contiguous_subsequence_matches_brute_force(window, context):
    assert is_contiguous_subsequence(window, context) == ref_contiguous(window, context)
    assert is_contiguous_subsequence(tuple(window), tuple(context)) == ref_contiguous(window, context)


@settings(max_examples=100, deadline=None)
@given(context=st.lists(st.integers(0, 5), min_size=1, max_size=10), data=st.data())
def test_every_slice_of_the_context_is_found(context, data):
    i = data.draw(st.integers(0, len(context) - 1))
    j = data.draw(st.integers(i + 1, len(context)))
    assert is_contiguous_subsequence(context[i:j], context)
    assert not is_contiguous_subsequence(context[i:j] + [99], context)


# --------------------------------------------------------------------------- blank or punct


blank_or_punct_text = st.text(alphabet=string.punctuation + " \t\n\r\u00a0\u3000", max_size=6)


@given(text=blank_or_punct_text)
@example(text="")
@example(text=" ")
@example(text="\n")
@example(text=" ,")
@example(text="...")
def test_only_whitespace_and_ascii_punctuation_is_blank(text):
    assert is_blank_or_punct(text)


@given(prefix=blank_or_punct_text, core=st.sampled_from(["a", "Z", "0", "é", "ß", "日", " Berlin"]),
       suffix=blank_or_punct_text)
def test_any_letter_or_digit_is_not_blank(prefix, core, suffix):
    assert not is_blank_or_punct(prefix + core + suffix)


# --------------------------------------------------------------------------- copy rule


@st.composite
def copy_cases(draw):
    """A case that collapses: every condition of the copy rule holds."""
    context = draw(st.lists(st.integers(0, 20), min_size=1, max_size=10))
    k = draw(st.integers(1, len(context)))
    start = draw(st.integers(0, len(context) - k))
    window = context[start:start + k]
    threshold = draw(st.sampled_from([0.5, 0.8, 0.95]))
    margin = draw(st.sampled_from([0.0, 0.1, 0.3]))
    p_top1 = draw(st.floats(threshold, 1.0, exclude_min=True))
    gap = p_top1 - margin
    p_top2 = draw(st.floats(0.0, gap, exclude_max=True)) if gap > 0 else 0.0
    if not p_top1 - p_top2 > margin:
        p_top2 = 0.0
    text = draw(st.sampled_from([" Berlin", "Germany", " the", "1", "é"]))
    return dict(window=window, context_ids=context, p_top1=p_top1, p_top2=p_top2,
                top1_text=text, threshold=threshold, margin=margin, k=k)


def _call(case, **changes):
    args = {**case, **changes}
    window, context = args.pop("window"), args.pop("context_ids")
    return copy_collapse(window, context, **args)


@settings(max_examples=80, deadline=None)
@given(case=copy_cases())
def test_copy_collapse_each_condition_flips_the_result(case):
    assert case["p_top1"] - case["p_top2"] > case["margin"]
    assert _call(case) is True
    # 1. window not full yet
    assert _call(case, window=case["window"][:-1]) is False
    # 2. window not a contiguous run of the context
    assert _call(case, window=case["window"][:-1] + [999]) is False
    # 3. p_top1 not above the threshold (the margin still holds: threshold > margin)
    assert case["threshold"] > case["margin"]
    assert _call(case, p_top1=case["threshold"], p_top2=0.0) is False
    assert _call(case, p_top1=case["threshold"] * 0.5, p_top2=0.0) is False
    # 4. margin not above copy_margin
    assert _call(case, p_top2=case["p_top1"]) is False
    # 5. top-1 text only whitespace/punctuation
    for blank in (" ", ",", " .", "\n", "?!"):
        assert _call(case, top1_text=blank) is False


def test_copy_collapse_boundaries_are_strict():
    # Dyadic numbers so the comparisons are exact.
    base = dict(window=[7], context_ids=[3, 7, 9], p_top1=0.96875, p_top2=0.5,
                top1_text=" simply", threshold=0.9375, margin=0.125, k=1)
    assert _call(base) is True
    assert _call(base, p_top1=0.9375) is False  # p_top1 == threshold
    assert _call(base, p_top2=0.84375) is False  # p_top1 - p_top2 == margin
    assert _call(base, p_top2=0.8125) is True  # margin 0.15625 > 0.125


def test_copy_collapse_window_with_k_two():
    base = dict(context_ids=[3, 7, 9], p_top1=0.99, p_top2=0.0, top1_text="x",
                threshold=0.95, margin=0.1, k=2)
    assert _call(base, window=[7, 9]) is True
    assert _call(base, window=[3, 9]) is False  # both ids in context, not adjacent
    assert _call(base, window=[9, 7]) is False  # wrong order
    assert _call(base, window=[9]) is False  # not full


# --------------------------------------------------------------------------- settle


@given(x=st.floats(-1e6, 1e6, allow_nan=False))
@example(x=-0.0)
@example(x=-4e-13)
@example(x=4.9e-13)
@example(x=1.23456789012345)
def test_settle_rounds_to_1e12_absolute(x):
    y = settle(x)
    assert type(y) is float
    assert y == round(x, 12)
    assert abs(y - x) <= 5e-13 + 1e-15 * abs(x)
    assert settle(y) == y
    if y == 0:
        assert math.copysign(1.0, y) == 1.0  # never -0.0


@pytest.mark.parametrize("value", [-0.0, -1e-13, -4.99e-13, np.float64(-0.0), torch.tensor(-0.0),
                                   torch.tensor(-3e-13, dtype=torch.float64)])
def test_settle_maps_negative_zero_to_positive_zero(value):
    y = settle(value)
    assert type(y) is float
    assert y == 0.0
    assert math.copysign(1.0, y) == 1.0
    assert str(y) == "0.0"


def test_settle_keeps_values_on_the_grid():
    assert settle(0.1234567890126) == 0.123456789013
    assert settle(-2.5e-12) == round(-2.5e-12, 12)
    assert settle(7e-12) == 7e-12
    assert metrics.ABS_DECIMALS == 12


@pytest.mark.parametrize("text", ["—", "。", " «»", "¿", "…"])
def test_non_ascii_punctuation_is_punctuation(text):
    assert is_blank_or_punct(text)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_probs_is_exp_above_the_denormal_floor_and_the_floor_below(dtype):
    """``probs`` is ``exp`` bit for bit down to log(tiny) + 0.34 (where exp's result
    is a normal number); below, the floor's exp, so that no denormal is made."""
    floor = math.log(torch.finfo(dtype).tiny) + 0.34
    above = torch.linspace(floor, 0.0, 10_001, dtype=dtype)
    assert torch.equal(metrics.probs(above), above.exp())
    below = torch.tensor([floor - 1e-3, floor - 5, floor - 100, -math.inf], dtype=dtype)
    got = metrics.probs(below)
    assert torch.equal(got, torch.full_like(below, floor).exp())
    assert bool((got >= torch.finfo(dtype).tiny).all())  # normal numbers only
    out = torch.empty_like(above)
    assert metrics.probs(above, out=out).data_ptr() == out.data_ptr()


@pytest.mark.parametrize("scale", [1.0, 12.0, 40.0])
def test_entropy_and_kl_of_peaked_float32_rows_equal_the_plain_formulas(scale):
    """Rows whose tokens are nearly all below e^-87 (deep layers' last positions): the
    floored terms change no float32 entropy or KL against the plain exp."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(16, 4096, generator=gen) * scale
    logp = torch.log_softmax(z, dim=-1)
    logq = torch.log_softmax(torch.randn(16, 4096, generator=gen) * scale, dim=-1)
    plain_h = (-(logp.exp() * logp).sum(-1) / math.log(2)).clamp_min(0.0)
    plain_kl = (((logp - logq) * logp.exp()).sum(-1) / math.log(2)).clamp_min(0.0)
    torch.testing.assert_close(entropy_bits(logp), plain_h, rtol=1e-6, atol=1e-30)
    torch.testing.assert_close(kl_bits(logp, logq), plain_kl, rtol=1e-6, atol=1e-30)
    assert bool((logp < -90).float().mean() > 0.5) or scale < 40  # the rows are peaked


def test_entropy_and_kl_with_impossible_tokens_stay_finite_under_the_floor():
    """log p = −inf times the floored p is −inf: such rows are summed again with the mask."""
    logp = torch.tensor([[math.log(0.5), math.log(0.5), -math.inf, -math.inf]])
    assert entropy_bits(logp).item() == pytest.approx(1.0)
    logq = torch.tensor([[math.log(0.25)] * 4])
    assert kl_bits(logp, logq).item() == pytest.approx(1.0)
    assert kl_bits(logq, logp).item() == math.inf  # q has mass where p has none


def test_a_row_alone_sums_as_it_does_among_other_rows():
    """``row_sum`` and ``cosine`` of a single long row give the bits of the same row in a
    batch, and of one thread: torch's own sum of a lone row is split between threads."""
    from lens.metrics import cosine, row_sum

    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(4, 49_152, generator=gen) * 3
    other = torch.randn(4, 49_152, generator=gen) * 3
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        sums, cosines = row_sum(rows), cosine(rows, other)
        for i in range(4):
            assert row_sum(rows[i]) == sums[i] and row_sum(rows[i:i + 1])[0] == sums[i]
            assert cosine(rows[i], other[i]) == cosines[i]
            assert cosine(rows[i:i + 1], other[i:i + 1]).shape == (1,)
        assert row_sum(rows[0]).shape == () and row_sum(rows[:1, :1]).shape == (1,)
        torch.set_num_threads(1)
        assert torch.equal(row_sum(rows), sums) and torch.equal(cosine(rows, other), cosines)
    finally:
        torch.set_num_threads(threads)
