"""Tests for lens.norms: norms recognised by behaviour, block order, norm per layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lens.errors import LensError
from lens.norms import NormSpec, describe_norm

D = 16
TOL = {torch.float64: {"rtol": 1e-6, "atol": 1e-6}, torch.float32: {"rtol": 1e-5, "atol": 1e-5}}


# --------------------------------------------------------------------------- home-made norms


class HandLayerNorm(nn.Module):
    """A LayerNorm written by hand, with unusual attribute names."""

    def __init__(self, d: int, epsilon: float = 1e-3) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(d))
        self.b = nn.Parameter(torch.zeros(d))
        self.epsilon = epsilon

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + self.epsilon) * self.g + self.b


class GemmaStyleRMSNorm(nn.Module):
    """RMSNorm scaling by ``1 + weight`` (weight initialised at zero), fp32 statistics."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class Bridge(nn.Module):
    """Stands in for a TransformerLens bridge component wrapping the library module."""

    def __init__(self, inner: nn.Module, attr: str = "_original_component") -> None:
        super().__init__()
        setattr(self, attr, inner)
        self._attr = attr

    def forward(self, x):
        return getattr(self, self._attr)(x)


class Scale(nn.Module):
    """Not a norm: ``x * weight``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.weight


class CentreOnly(nn.Module):
    """Not a norm either: shift-invariant but never rescaled."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return (x - x.mean(-1, keepdim=True)) * self.weight


def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + 1.0)
    return module


# name → (factory, kind, weight_offset, has_weight, has_bias, eps)
CASES = {
    "torch_layernorm": (lambda: nn.LayerNorm(D, eps=1e-5), "LayerNorm", 0.0, True, True, 1e-5),
    "torch_layernorm_no_bias": (lambda: nn.LayerNorm(D, eps=1e-4, bias=False), "LayerNorm", 0.0,
                                True, False, 1e-4),
    "llama_rmsnorm": (lambda: LlamaRMSNorm(D, eps=1e-6), "RMSNorm", 0.0, True, False, 1e-6),
    "hand_layernorm": (lambda: HandLayerNorm(D, epsilon=1e-3), "LayerNorm", 0.0, True, True, 1e-3),
    "gemma_rmsnorm": (lambda: GemmaStyleRMSNorm(D, eps=1e-6), "RMSNorm", 1.0, True, False, 1e-6),
    "bridged_layernorm": (lambda: Bridge(nn.LayerNorm(D, eps=1e-5)), "LayerNorm", 0.0, True, True,
                          1e-5),
    "bridged_rmsnorm": (lambda: Bridge(LlamaRMSNorm(D, eps=1e-5), "original_component"), "RMSNorm",
                        0.0, True, False, 1e-5),
}


def _build(name: str, dtype: torch.dtype) -> nn.Module:
    return _randomise(CASES[name][0](), seed=len(name)).to(dtype)


def _inputs(seed: int, scale: float, offset: float, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, D, generator=gen, dtype=torch.float64) * scale + offset * scale
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(CASES))
def test_describe_norm_recognises_the_module(name, dtype):
    _, kind, offset, has_weight, has_bias, eps = CASES[name]
    module = _build(name, dtype)
    spec = describe_norm(module)
    assert spec.kind == kind
    assert spec.weight_offset == offset
    assert (spec.weight is not None) == has_weight
    assert (spec.bias is not None) == has_bias
    assert spec.eps == pytest.approx(eps)
    x = _inputs(1, 2.0, 0.3, dtype)
    with torch.no_grad():
        torch.testing.assert_close(spec(x), module(x), **TOL[dtype])


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.sampled_from([1e-2, 0.1, 1.0, 10.0, 300.0]),
       offset=st.floats(-2.0, 2.0))
@example(seed=0, scale=1e-2, offset=0.0)  # small residuals: eps matters here
def test_describe_norm_reproduces_the_module_at_any_scale(name, seed, scale, offset):
    module = _build(name, torch.float64)
    spec = describe_norm(module)
    x = _inputs(seed, scale, offset, torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(spec(x), module(x), **TOL[torch.float64])


def test_describe_norm_reads_weights_without_copying_into_the_module():
    module = _build("torch_layernorm", torch.float32)
    before = [p.detach().clone() for p in module.parameters()]
    spec = describe_norm(module)
    spec(torch.randn(2, D))
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, module.parameters(), strict=True))
    assert not spec.weight.requires_grad


@pytest.mark.parametrize("factory,kind", [
    (lambda: nn.LayerNorm(D, elementwise_affine=False), "LayerNorm"),
    (lambda: nn.RMSNorm(D, eps=1e-6, elementwise_affine=False), "RMSNorm"),
])
def test_describe_norm_without_affine_parameters(factory, kind):
    module = factory().double()
    spec = describe_norm(module)
    assert spec.kind == kind
    x = _inputs(2, 1.0, 0.0, torch.float64)
    torch.testing.assert_close(spec(x), module(x), **TOL[torch.float64])


def test_describe_norm_eps_default_of_torch_rmsnorm():
    module = _randomise(nn.RMSNorm(D)).double()
    spec = describe_norm(module)
    x = _inputs(3, 1e-2, 0.0, torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(spec(x), module(x), **TOL[torch.float64])


@pytest.mark.parametrize("factory", [Scale, CentreOnly])
def test_describe_norm_refuses_a_module_that_is_no_norm(factory):
    with pytest.raises(LensError, match="neither LayerNorm nor RMSNorm"):
        describe_norm(factory(D))


def test_describe_norm_refuses_a_module_without_any_size():
    with pytest.raises(LensError):
        describe_norm(nn.ReLU())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["torch_layernorm", "llama_rmsnorm", "gemma_rmsnorm"])
def test_describe_norm_in_low_precision(name, dtype):
    _, kind, offset, *_ = CASES[name]
    module = _build(name, dtype)
    spec = describe_norm(module)
    assert spec.kind == kind
    assert spec.weight_offset == offset
    x = _inputs(4, 1.0, 0.2, dtype)
    out = spec(x)
    assert out.dtype == dtype
    with torch.no_grad():
        torch.testing.assert_close(out.float(), module(x).float(), rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------- NormSpec statistics


def _ref_layernorm(x, w, b, eps):
    return F.layer_norm(x.float(), (x.shape[-1],), w.float(), b.float(), eps)


def _ref_rmsnorm(x, w, eps):
    h = x.float()
    return h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w.float()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.sampled_from([1e-2, 1.0, 50.0, 1000.0]))
@example(seed=0, scale=1000.0)  # x² overflows float16: statistics must not be in float16
def test_normspec_statistics_in_fp32_cast_back(dtype, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(4, D, generator=gen) * scale).to(dtype)
    w = (torch.randn(D, generator=gen) * 0.5 + 1).to(dtype)
    b = torch.randn(D, generator=gen).to(dtype)
    ulp = {"rtol": 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10, "atol": 1e-3}

    ln = NormSpec(kind="LayerNorm", weight=w, bias=b, eps=1e-5)(x)
    assert ln.dtype == dtype
    assert torch.isfinite(ln).all()
    torch.testing.assert_close(ln, _ref_layernorm(x, w, b, 1e-5).to(dtype), **ulp)

    rms = NormSpec(kind="RMSNorm", weight=w, bias=None, eps=1e-6)(x)
    assert rms.dtype == dtype
    assert torch.isfinite(rms).all()
    torch.testing.assert_close(rms, _ref_rmsnorm(x, w, 1e-6).to(dtype), **ulp)


def test_normspec_maths_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0]], dtype=torch.float64)
    # LayerNorm: mean 3, biased variance 3.5
    ln = NormSpec(kind="LayerNorm", weight=None, bias=None, eps=0.5)(x)
    torch.testing.assert_close(ln, (x - 3.0) / 2.0)
    # RMSNorm: mean(x²) = 12.5; eps inside the root; γ optional; offset adds to γ
    rms = NormSpec(kind="RMSNorm", weight=None, bias=None, eps=3.5)(x)
    torch.testing.assert_close(rms, x / 4.0)
    w = torch.tensor([0.0, 1.0, -1.0, 2.0], dtype=torch.float64)
    gemma = NormSpec(kind="RMSNorm", weight=w, bias=None, eps=3.5, weight_offset=1.0)(x)
    torch.testing.assert_close(gemma, x / 4.0 * (1.0 + w))
    bias = torch.full((4,), 0.25, dtype=torch.float64)
    ln_affine = NormSpec(kind="LayerNorm", weight=w, bias=bias, eps=0.5)(x)
    torch.testing.assert_close(ln_affine, (x - 3.0) / 2.0 * w + 0.25)
