"""Architecture-aware normalisation for the norm lens (docs/outputs.md).

A norm is recognised by what the module *does*, not by its class name: the
baseline missed TransformerLens' own LayerNorm class and decoded GPT-2 with RMS
scaling. We probe the module once with fixed inputs: if adding a constant to
the input leaves the output unchanged it centres (LayerNorm), otherwise it is
an RMSNorm; the extracted ``γ``, ``β`` and ``eps`` must then reproduce the
module's own output, else we refuse rather than decode with the wrong maths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lens.errors import LensError

NormKind = Literal["LayerNorm", "RMSNorm"]


@dataclass(frozen=True, eq=False)
class NormSpec:
    """A normalisation as maths: ``kind``, scale ``weight`` (γ), ``bias`` (β), ``eps``.

    ``weight_offset`` is 1 for norms that scale by ``1 + γ`` (Gemma style).
    """

    kind: NormKind
    weight: Tensor | None
    bias: Tensor | None
    eps: float
    weight_offset: float = 0.0

    def __call__(self, x: Tensor) -> Tensor:
        """Normalise ``x`` (..., d_model); statistics in at least fp32, result in ``x.dtype``."""
        stats_dtype = torch.promote_types(x.dtype, torch.float32)
        h = x.to(stats_dtype)
        if self.kind == "LayerNorm":
            h = h - h.mean(dim=-1, keepdim=True)
            h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        else:
            h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight is not None:
            h = h * (self.weight.to(device=h.device, dtype=stats_dtype) + self.weight_offset)
        if self.bias is not None:
            h = h + self.bias.to(device=h.device, dtype=stats_dtype)
        return h.to(x.dtype)


def unwrap(module: nn.Module) -> nn.Module:
    """The library module behind a wrapper component (e.g. a TransformerLens bridge), or itself."""
    for attr in ("original_component", "_original_component"):
        inner = getattr(module, attr, None)
        if isinstance(inner, nn.Module):
            return inner
    return module


def _param(module: nn.Module, names: Sequence[str]) -> Tensor | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, Tensor):
            return value.detach()
    return None


def _eps(module: nn.Module, dtype: torch.dtype) -> float:
    for name in ("eps", "variance_epsilon", "epsilon", "layer_norm_eps", "rms_norm_eps"):
        value = getattr(module, name, None)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return float(torch.finfo(dtype).eps)  # torch.nn.RMSNorm's eps=None


def _size(module: nn.Module, ref: Tensor | None, d_model: int | None) -> int:
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, tuple | list) and shape:
        return int(shape[-1])
    if ref is not None:
        return int(ref.shape[-1])
    if d_model is not None:
        return d_model
    raise LensError(f"cannot read the size of norm module {type(module).__name__}")


def describe_norm(module: nn.Module, *, d_model: int | None = None,
                  dtype: torch.dtype | None = None, device: torch.device | None = None) -> NormSpec:
    """Recognise ``module`` as a LayerNorm or an RMSNorm by probing its behaviour.

    Probes at two scales (rms ≈ 3 and ≈ 1e-3) so that a wrong ``eps`` shows up.
    ``d_model``/``dtype``/``device`` are needed only for norms without parameters.
    """
    inner = unwrap(module)
    weight = _param(inner, ("weight", "scale", "gamma", "g"))
    bias = _param(inner, ("bias", "beta", "b"))
    ref = weight if weight is not None else bias
    dtype = ref.dtype if ref is not None else (dtype or torch.float32)
    device = ref.device if ref is not None else (device or torch.device("cpu"))
    d = _size(inner, ref, d_model)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, d, generator=gen, dtype=torch.float64) + 0.5
    probes = [(base * scale).to(device=device, dtype=dtype) for scale in (3.0, 1e-3)]
    low = dtype in (torch.float16, torch.bfloat16)
    tol = {"rtol": 2e-2, "atol": 2e-2} if low else {"rtol": 1e-4, "atol": 1e-5}
    with torch.no_grad():
        outputs = [inner(x) for x in probes]
        shifted = inner(probes[0] + 2.0)
    kind: NormKind = "LayerNorm" if torch.allclose(outputs[0], shifted, **tol) else "RMSNorm"
    eps = _eps(inner, dtype)
    for offset in (0.0, 1.0):
        spec = NormSpec(kind=kind, weight=weight, bias=bias, eps=eps, weight_offset=offset)
        if all(torch.allclose(spec(x), y, **tol) for x, y in zip(probes, outputs, strict=True)):
            return spec
    raise LensError(
        f"unsupported normalisation module {type(inner).__name__}: it behaves like neither "
        "LayerNorm nor RMSNorm with its own parameters; the norm lens cannot decode this model"
    )
