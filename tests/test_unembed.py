"""Tests for lens.unembed: dtype rules, the cache, and the fp32 shadow copy."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lens.errors import LensError
from lens.unembed import (
    CPU_BLOCK_COLUMNS,
    NO_TRANSFORM,
    HeadTransform,
    Unembed,
    analysis_dtype,
    detect_head_transform,
    unembed_dtype,
)

FAST = settings(max_examples=40, deadline=None)
ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
CPU = torch.device("cpu")


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@st.composite
def unembed_inputs(draw, dtypes=(torch.float32, torch.float64)):
    seed = draw(st.integers(0, 2**31 - 1))
    d_model, d_vocab = draw(st.integers(1, 12)), draw(st.integers(1, 20))
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    dtype = draw(st.sampled_from(dtypes))
    with_bias = draw(st.booleans())
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(d_model, d_vocab, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(d_vocab, generator=gen, dtype=torch.float64).to(dtype) if with_bias else None
    x = torch.randn(*lead, d_model, generator=gen, dtype=torch.float64).to(dtype)
    return W, b, x


# --------------------------------------------------------------------------- dtype rules


@pytest.mark.parametrize("model_dtype,flag,expected", [
    (torch.float16, False, torch.float32),
    (torch.float16, True, torch.float32),
    (torch.bfloat16, False, torch.float32),
    (torch.bfloat16, True, torch.float32),
    (torch.float32, False, torch.float32),
    (torch.float32, True, torch.float32),
    (torch.float64, False, torch.float64),
    (torch.float64, True, torch.float64),  # the flag never lowers precision
])
def test_unembed_dtype(model_dtype, flag, expected):
    assert unembed_dtype(model_dtype, fp32_unembed=flag) == expected


@pytest.mark.parametrize("model_dtype,expected", [
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
])
def test_analysis_dtype(model_dtype, expected):
    assert analysis_dtype(model_dtype) == expected


@pytest.mark.parametrize("model_dtype", ALL_DTYPES)
@pytest.mark.parametrize("flag", [False, True])
def test_is_shadow_iff_decoding_dtype_differs(model_dtype, flag):
    W = torch.zeros(3, 5, dtype=model_dtype)
    dtype = unembed_dtype(model_dtype, fp32_unembed=flag)
    u = Unembed(W, None, dtype=dtype)
    assert u.is_shadow == (model_dtype in (torch.float16, torch.bfloat16))
    assert u.dtype == dtype
    assert u.d_vocab == 5
    assert Unembed(W, None, dtype=torch.float64).is_shadow == (model_dtype != torch.float64)


# --------------------------------------------------------------------------- numerics


@FAST
@given(case=unembed_inputs())
def test_cache_and_no_cache_give_identical_logits(case):
    W, b, x = case
    cached = Unembed(W, b, dtype=W.dtype, cache=True)
    uncached = Unembed(W, b, dtype=W.dtype, cache=False)
    first = cached(x)
    second = cached(x)  # served from the cache
    plain = uncached(x)
    assert first.shape == (*x.shape[:-1], W.shape[1])
    assert first.dtype == W.dtype
    assert torch.equal(first, second)
    assert torch.equal(first, plain)
    assert torch.equal(plain, uncached(x))
    expected = x @ W if b is None else x @ W + b
    torch.testing.assert_close(first, expected)


@FAST
@given(case=unembed_inputs(dtypes=(torch.float16, torch.bfloat16)))
def test_shadow_decoding_matches_fp32_reference(case):
    W, b, x = case
    u = Unembed(W, b, dtype=torch.float32)
    logits = u(x)
    assert logits.dtype == torch.float32
    ref = x.float() @ W.float()
    if b is not None:
        ref = ref + b.float()
    torch.testing.assert_close(logits, ref)
    assert torch.equal(logits, Unembed(W, b, dtype=torch.float32, cache=False)(x))


def test_input_is_cast_to_the_decoding_dtype():
    W = torch.randn(4, 6, dtype=torch.float64)
    u = Unembed(W, None, dtype=torch.float64)
    x32 = torch.randn(2, 4, dtype=torch.float32)
    out = u(x32)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, x32.double() @ W)


def test_cache_reuses_one_copy_per_device_and_no_cache_does_not():
    W = torch.randn(4, 6, dtype=torch.float16)
    b = torch.randn(6, dtype=torch.float16)
    cached = Unembed(W, b, dtype=torch.float32, cache=True)
    w1, b1 = cached.weights(CPU)
    w2, b2 = cached.weights(CPU)
    assert w1 is w2 and b1 is b2
    uncached = Unembed(W, b, dtype=torch.float32, cache=False)
    w3, _ = uncached.weights(CPU)
    w4, _ = uncached.weights(CPU)
    assert w3 is not w4
    assert _storage(w3) != _storage(w4)


def test_logits_do_not_require_grad_even_for_parameters():
    W = nn.Parameter(torch.randn(4, 6))
    b = nn.Parameter(torch.randn(6))
    out = Unembed(W, b, dtype=torch.float32)(torch.randn(3, 4, requires_grad=True))
    assert not out.requires_grad


# --------------------------------------------------------------------------- the shadow copy


class TinyHead(nn.Module):
    def __init__(self, d_model: int, d_vocab: int, dtype: torch.dtype, bias: bool) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(d_model * 100 + d_vocab)
        self.W_U = nn.Parameter(torch.randn(d_model, d_vocab, generator=gen).to(dtype))
        self.b_U = nn.Parameter(torch.randn(d_vocab, generator=gen).to(dtype)) if bias else None


@pytest.mark.parametrize("model_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("flag", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cache", [True, False])
def test_shadow_never_touches_the_model_weights(model_dtype, flag, bias, cache):
    head = TinyHead(5, 9, model_dtype, bias)
    W_before = head.W_U.detach().clone()
    b_before = None if head.b_U is None else head.b_U.detach().clone()
    u = Unembed(head.W_U, head.b_U, dtype=unembed_dtype(model_dtype, fp32_unembed=flag), cache=cache)
    assert u.is_shadow

    x = torch.randn(2, 5, dtype=model_dtype)
    before = u(x)
    W_s, b_s = u.weights(CPU)
    assert W_s.dtype == torch.float32
    assert not W_s.requires_grad
    assert _storage(W_s) != _storage(head.W_U)
    if bias:
        assert b_s is not None and b_s.dtype == torch.float32
        assert _storage(b_s) != _storage(head.b_U)
    else:
        assert b_s is None

    # Scribbling over the shadow must leave the model as it was.
    with torch.no_grad():
        W_s.fill_(123.0)
        if b_s is not None:
            b_s.fill_(-7.0)
    assert head.W_U.dtype == model_dtype
    assert torch.equal(head.W_U.detach(), W_before)
    if bias:
        assert head.b_U.dtype == model_dtype
        assert torch.equal(head.b_U.detach(), b_before)
    # The shadow is a faithful fp32 copy of the model's weights.
    if not cache:
        torch.testing.assert_close(u.weights(CPU)[0], W_before.float(), rtol=0, atol=0)
        assert torch.equal(u(x), before)


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_full_precision_decoding_does_not_mutate_weights(model_dtype, bias):
    head = TinyHead(5, 9, model_dtype, bias)
    W_before = head.W_U.detach().clone()
    b_before = None if head.b_U is None else head.b_U.detach().clone()
    u = Unembed(head.W_U, head.b_U, dtype=unembed_dtype(model_dtype, fp32_unembed=True))
    assert not u.is_shadow
    out = u(torch.randn(3, 5, dtype=model_dtype))
    out.add_(1.0)  # the logits are a fresh tensor, not a view of the weights
    assert torch.equal(head.W_U.detach(), W_before)
    if bias:
        assert torch.equal(head.b_U.detach(), b_before)
    W_s, _ = u.weights(CPU)
    assert not W_s.requires_grad


# --------------------------------------------------------------------------- the model's head


def _config(**keys):  # type: ignore[no-untyped-def]
    return type("Config", (), keys)()


Z = torch.linspace(-40.0, 40.0, 81, dtype=torch.float64).reshape(3, 27)


@pytest.mark.parametrize("keys,forward,steps", [
    ({}, lambda z: z, ()),
    ({"final_logit_softcapping": 30.0}, lambda z: torch.tanh(z / 30.0) * 30.0,
     (("softcap", 30.0, "final_logit_softcapping"),)),
    ({"logit_scale": 0.0625}, lambda z: z * 0.0625, (("multiply", 0.0625, "logit_scale"),)),
    ({"logits_scaling": 8.0}, lambda z: z / 8.0, (("divide", 8.0, "logits_scaling"),)),
    ({"logit_scale": 4.0, "final_logit_softcapping": 10.0},
     lambda z: torch.tanh(z / 4.0 / 10.0) * 10.0,
     (("divide", 4.0, "logit_scale"), ("softcap", 10.0, "final_logit_softcapping"))),
    ({"final_logit_softcapping": 30.0}, lambda z: z, ()),  # declared but not applied: the forward decides
])
def test_head_transform_is_what_the_forward_does(keys, forward, steps):
    head = detect_head_transform(_config(**keys), Z, forward(Z))
    assert head.steps == steps
    torch.testing.assert_close(head(Z.clone()), forward(Z), rtol=1e-12, atol=1e-12)


def test_unexplained_head_is_refused():
    with pytest.raises(LensError, match="does not recognise.*logit_scale"):
        detect_head_transform(_config(logit_scale=3.0), Z, Z * 0.5)


def test_cfg_transform_keeps_the_baseline_format_without_a_transform():
    assert NO_TRANSFORM.as_json() == {"scale": None, "softcap": None}
    cohere = HeadTransform((("multiply", 0.0625, "logit_scale"),))
    assert cohere.as_json() == {"scale": 16.0, "softcap": None,
                                "applied": [["multiply", 0.0625, "logit_scale"]]}


def test_unembed_decodes_through_the_head():
    W = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 20
    b = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    capped = HeadTransform((("softcap", 5.0, "final_logit_softcapping"),))
    x = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = Unembed(W, b, dtype=torch.float64, head=capped)(x)
    torch.testing.assert_close(got, torch.tanh((x @ W + b) / 5.0) * 5.0)


@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5)])
@pytest.mark.parametrize("bias", [False, True])
def test_column_blocks_give_the_whole_matmul_bit_for_bit(lead, bias):
    """A float32 CPU unembedding wider than two blocks runs block by block
    (``CPU_BLOCK_COLUMNS``), into ``out`` when given; its logits are those of one
    matmul through the head, for ``W_U`` as a model gives it (``LoadedModel.W_U``:
    a transposed view of the head's weight)."""
    gen = torch.Generator().manual_seed(7)
    d_model, d_vocab = 24, 3 * CPU_BLOCK_COLUMNS + 37  # a ragged last block
    W = torch.randn(d_vocab, d_model, generator=gen).T
    b = torch.randn(d_vocab, generator=gen) if bias else None
    x = torch.randn(*lead, d_model, generator=gen)
    capped = HeadTransform((("softcap", 3.0, "final_logit_softcapping"),))
    unembed = Unembed(W, b, dtype=torch.float32, head=capped)
    whole = torch.matmul(x, W)
    if b is not None:
        whole.add_(b)
    expected = torch.tanh(whole / 3.0) * 3.0
    assert torch.equal(unembed(x), expected)
    out = torch.full((*lead, d_vocab), float("nan"))
    got = unembed(x, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(out, expected)
