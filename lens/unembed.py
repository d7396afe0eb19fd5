"""Unembedding with an fp32 shadow copy: never touch the model's own weights.

With fp16/bf16 compute (or ``--fp32-unembed``) the analysis decodes through a
float32 copy of ``W_U``/``b_U``; the copy is made once per device and reused.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOW_PRECISION = (torch.float16, torch.bfloat16)


def analysis_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """Softmax/entropy/KL precision: fp32, or fp64 when the model itself runs in fp64."""
    return torch.float64 if model_dtype == torch.float64 else torch.float32


def unembed_dtype(model_dtype: torch.dtype, *, fp32_unembed: bool) -> torch.dtype:
    """The dtype W_U is applied in: an fp32 shadow for low precision or when asked."""
    if model_dtype in LOW_PRECISION or fp32_unembed:
        return torch.promote_types(model_dtype, torch.float32)
    return model_dtype


class Unembed:
    """``x @ W_U + b_U`` in a fixed dtype, with per-device cached shadow weights.

    Args:
        W_U: (d_model, d_vocab) the model's unembedding (read, never written).
        b_U: (d_vocab,) or None.
        dtype: the dtype to decode in; a copy is made only when it differs.
    """

    def __init__(self, W_U: Tensor, b_U: Tensor | None, *, dtype: torch.dtype,
                 cache: bool = True) -> None:
        self._W_U = W_U
        self._b_U = b_U
        self.dtype = dtype
        self._cache: dict[torch.device, tuple[Tensor, Tensor | None]] | None = {} if cache else None

    @property
    def is_shadow(self) -> bool:
        return self.dtype != self._W_U.dtype

    @property
    def d_vocab(self) -> int:
        return int(self._W_U.shape[-1])

    def weights(self, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """(W, b) on ``device`` in ``self.dtype``; copies are detached from the model."""
        if self._cache is not None and device in self._cache:
            return self._cache[device]
        with torch.no_grad():
            W = self._W_U.detach().to(device=device, dtype=self.dtype)
            b = None if self._b_U is None else self._b_U.detach().to(device=device, dtype=self.dtype)
        if self._cache is not None:
            self._cache[device] = (W, b)
        return W, b

    def __call__(self, x: Tensor) -> Tensor:
        """(..., d_model) → (..., d_vocab) logits in ``self.dtype``."""
        W, b = self.weights(x.device)
        with torch.no_grad():
            logits = x.to(self.dtype) @ W
            return logits if b is None else logits.add_(b)  # in place: no second logits tensor
