"""Lenses: interchangeable decoders of a residual stream into logits.

A lens maps the residual after ``layer`` to the vector that goes through the
unembedding. ``NormLens`` is the primary lens; ``RawLens`` decodes without
normalisation (the lens-artifact check); a fitted lens such as Prism is one
more subclass. Nothing else changes when a lens is added.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from lens.norms import NormSpec
from lens.unembed import Unembed


class Lens(ABC):
    """Decode residuals: ``forward(resid, layer) -> logits``."""

    name: str

    def __init__(self, unembed: Unembed) -> None:
        self.unembed = unembed

    @abstractmethod
    def transform(self, resid: Tensor, layer: int) -> Tensor:
        """(seq, d_model) residual → (seq, d) input of the unembedding."""

    def forward(self, resid: Tensor, layer: int) -> Tensor:
        """(seq, d_model) → (seq, d_vocab) logits in the unembedding dtype."""
        return self.unembed(self.transform(resid, layer))

    def decode(self, resids: Tensor, layers: Sequence[int]) -> Tensor:
        """Many layers in one matmul: (len(layers), seq, d_model) → (len(layers), seq, vocab)."""
        inputs = torch.stack([self.transform(r, layer) for r, layer in zip(resids, layers, strict=True)])
        return self.unembed(inputs)


class NormLens(Lens):
    """Normalise with the module the model applies next (SPEC §2), then unembed."""

    name = "norm"

    def __init__(self, unembed: Unembed, norms: Sequence[NormSpec]) -> None:
        super().__init__(unembed)
        self.norms = tuple(norms)

    def transform(self, resid: Tensor, layer: int) -> Tensor:
        return self.norms[layer](resid)


class RawLens(Lens):
    """No normalisation: what the logit lens shows without the model's own norm."""

    name = "raw"

    def transform(self, resid: Tensor, layer: int) -> Tensor:
        return resid


class LogitLens(Lens):
    """The standard logit lens: the model's final norm on every layer's residual, then the head.

    What TransformerLens' ``accumulated_resid(apply_ln=True)`` and tuned-lens's
    ``LogitLens`` decode, and the tuned lens with every translator at zero.
    """

    name = "logit"

    def __init__(self, unembed: Unembed, final_norm: NormSpec) -> None:
        super().__init__(unembed)
        self.final_norm = final_norm

    def transform(self, resid: Tensor, layer: int) -> Tensor:
        return self.final_norm(resid)
