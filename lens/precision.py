"""Float64 runs that are float64 everywhere, hence byte-reproducible on any CPU.

Hugging Face model code hard-codes float32 "islands" for numerical safety in
half precision: RMSNorm statistics, rotary cos/sin tables, the eager attention
softmax. In a float64 run those islands are the only float32 maths left, and
their last bits depend on the CPU kernel (scalar vs AVX2 vs AVX-512), which
shows up at the 1e-7 level in every probability. ``Float64Everywhere`` is a
``TorchFunctionMode`` that turns each request for float32 into float64 while a
float64 model loads and runs, so the whole computation is float64 and 10
significant digits are identical across kernels and thread counts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode


class Float64Everywhere(TorchFunctionMode):
    """Promote every float32 cast or dtype argument to float64."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.float:
            func = torch.Tensor.double
        if kwargs.get("dtype") is torch.float32:
            kwargs["dtype"] = torch.float64
        if func in (torch.Tensor.to, torch.Tensor.type):
            args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def model_precision(dtype: torch.dtype) -> Iterator[None]:
    """Run model code under ``Float64Everywhere`` when the model is float64; else as is."""
    if dtype != torch.float64:
        yield
        return
    with Float64Everywhere():
        yield
