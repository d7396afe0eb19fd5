"""The model's full head: unembedding (with an fp32 shadow copy) and its logit transform.

With fp16/bf16 compute (or ``--fp32-unembed``) the analysis decodes through a
float32 copy of ``W_U``/``b_U``; the copy is made once per device and reused.
Whatever the model's forward does to the unembedding's output (Gemma 2/3
soft-cap, Cohere's and Granite's logit scales) is part of the head, so every
lens decodes exactly as the model's own head does.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lens.errors import LensError

LOW_PRECISION = (torch.float16, torch.bfloat16)
SCALE_KEYS = ("final_logit_scale", "logit_scale", "final_logits_scale", "logits_scaling")
"""Config keys of a logit scale: the baseline's, plus Granite's ``logits_scaling``. Whether
a model multiplies or divides by it differs by family (Cohere multiplies by
``logit_scale``, Granite divides by ``logits_scaling``), so both are tried against
the model's own forward."""
SOFTCAP_KEYS = ("final_logit_softcap", "logit_softcap", "final_logits_softcap", "softcap",
                "final_logit_softcapping", "output_logits_soft_cap")
"""The baseline's soft-cap keys, Hugging Face's ``final_logit_softcapping`` (Gemma 2/3)
and TransformerLens' ``output_logits_soft_cap``."""
Op = Literal["multiply", "divide", "softcap"]


@dataclass(frozen=True)
class HeadTransform:
    """What the model's forward applies to ``x @ W_U + b_U``, in order.

    ``steps`` holds ``(op, value, config key)``: ``multiply``/``divide`` by a
    logit scale, then ``softcap`` (``tanh(z / c) · c``, as Gemma 2/3 compute it).
    """

    steps: tuple[tuple[Op, float, str], ...] = ()

    def __call__(self, logits: Tensor) -> Tensor:
        """Apply the steps in place to ``logits`` (a fresh tensor owned by the caller)."""
        for op, value, _ in self.steps:
            if op == "multiply":
                logits.mul_(value)
            elif op == "divide":
                logits.div_(value)
            else:
                logits.div_(value).tanh_().mul_(value)
        return logits

    def as_json(self) -> dict[str, Any]:
        """``cfg_transform``: ``scale`` (the divisor: z/scale) and ``softcap``.

        A model without a transform gives exactly ``{scale: null, softcap: null}``;
        one with a transform adds ``applied``: its steps as ``[op, value, key]``.
        """
        scale = next((v if op == "divide" else 1.0 / v for op, v, _ in self.steps
                      if op != "softcap"), None)
        softcap = next((v for op, v, _ in self.steps if op == "softcap"), None)
        values: dict[str, Any] = {"scale": scale, "softcap": softcap}
        if self.steps:
            values["applied"] = [list(step) for step in self.steps]
        return values


NO_TRANSFORM = HeadTransform()


def _declared(config: Any, keys: Sequence[str]) -> list[tuple[float, str]]:
    found = []
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int | float) and not isinstance(value, bool) and value:
            found.append((float(value), key))
    return found


def detect_head_transform(config: Any, head_out: Tensor, logits: Tensor) -> HeadTransform:
    """The transform that turns the unembedding's output into the model's logits.

    Candidates come from the config's declared keys; each is applied to
    ``head_out`` and kept only if it reproduces ``logits`` (the model's own
    forward is the judge, not the key's name). No candidate and unequal
    logits is refused: every lens would decode with the wrong head.

    Args:
        config: The Hugging Face config.
        head_out: (seq, d_vocab) the unembedding's output on one forward.
        logits: (seq, d_vocab) the model's logits on the same forward.
    """
    low = head_out.dtype in LOW_PRECISION
    tol = {"rtol": 2e-2, "atol": 2e-2} if low else {"rtol": 1e-5, "atol": 1e-5}
    want = logits.detach().to(torch.float64)
    scales: list[tuple[Op, float, str] | None] = [None]
    for value, key in _declared(config, SCALE_KEYS):
        scales += [("multiply", value, key), ("divide", value, key)]
    caps: list[tuple[Op, float, str] | None] = [None]
    caps += [("softcap", value, key) for value, key in _declared(config, SOFTCAP_KEYS)]
    for scale, cap in itertools.product(scales, caps):
        candidate = HeadTransform(tuple(s for s in (scale, cap) if s is not None))
        got = candidate(head_out.detach().to(torch.float64).clone())
        if got.shape == want.shape and torch.allclose(got, want, equal_nan=True, **tol):
            return candidate
    keys = [k for _, k in _declared(config, (*SCALE_KEYS, *SOFTCAP_KEYS))]
    raise LensError(f"the model changes its logits after the unembedding in a way lens does not "
                    f"recognise (declared config keys: {keys or 'none'}); the lens cannot decode "
                    "as its head does")


def analysis_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """Softmax/entropy/KL precision: fp32, or fp64 when the model itself runs in fp64."""
    return torch.float64 if model_dtype == torch.float64 else torch.float32


def unembed_dtype(model_dtype: torch.dtype, *, fp32_unembed: bool) -> torch.dtype:
    """The dtype W_U is applied in: an fp32 shadow for low precision or when asked."""
    if model_dtype in LOW_PRECISION or fp32_unembed:
        return torch.promote_types(model_dtype, torch.float32)
    return model_dtype


class Unembed:
    """``head(x @ W_U + b_U)`` in a fixed dtype, with per-device cached shadow weights.

    Args:
        W_U: (d_model, d_vocab) the model's unembedding (read, never written).
        b_U: (d_vocab,) or None.
        dtype: the dtype to decode in; a copy is made only when it differs.
        head: what the model's forward applies to the unembedding's output.
    """

    def __init__(self, W_U: Tensor, b_U: Tensor | None, *, dtype: torch.dtype,
                 head: HeadTransform = NO_TRANSFORM, cache: bool = True) -> None:
        self._W_U = W_U
        self._b_U = b_U
        self.head = head
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

    def __call__(self, x: Tensor, *, out: Tensor | None = None) -> Tensor:
        """(..., d_model) → (..., d_vocab) logits in ``self.dtype``, through the full head.

        ``out`` (contiguous, the result's shape and dtype) receives the logits
        instead of a new tensor: a decode loop reuses one buffer for every chunk.
        """
        W, b = self.weights(x.device)
        with torch.no_grad():
            x = x.to(self.dtype)
            if not _blocked(x, W):
                logits = torch.matmul(x, W, out=out)
                if b is not None:
                    logits.add_(b)  # in place: no second logits tensor
                return self.head(logits)
            shape = (*x.shape[:-1], W.shape[1])
            logits = torch.empty(shape, dtype=self.dtype) if out is None else out
            rows, flat = x.reshape(-1, x.shape[-1]), logits.view(-1, W.shape[1])
            for a in range(0, W.shape[1], CPU_BLOCK_COLUMNS):
                block = flat[:, a:a + CPU_BLOCK_COLUMNS]
                torch.mm(rows, W[:, a:a + CPU_BLOCK_COLUMNS], out=block)
                if b is not None:
                    block.add_(b[a:a + CPU_BLOCK_COLUMNS])  # while the block is in cache
            return self.head(logits)


CPU_BLOCK_COLUMNS = 512
"""A float32 CPU unembedding runs as matmuls of this many vocabulary columns each,
written straight into their slice of the logits.

MKL's single matmul of (rows, d_model) by (d_model, vocab) ran 20-35 % slower
than these blocks (SmolLM2: d_model 576, vocab 49 152; 31-400 rows, 1 and 2
threads; ``benchmarks/README.md``). For ``W_U`` as a model gives it (a
transposed view of the head's weight) the blocks' float32 logits were bit for
bit those of the whole matmul in every shape tried (d_model 24-2048, vocab
1.5k-50k, 1-187 rows; tests/test_unembed.py); with a contiguous ``W_U`` MKL's
whole matmul of a few rows can differ in the last bit. float64, the golden
runs' dtype, is left whole: there MKL sums narrow blocks in another order.
"""


def _blocked(x: Tensor, W: Tensor) -> bool:
    """Whether ``x @ W`` runs in column blocks (``CPU_BLOCK_COLUMNS``)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() >= 2
            and W.shape[1] > 2 * CPU_BLOCK_COLUMNS)
