"""The standard logit lens: the model's final norm on every layer's residual, then its head.

This is what TransformerLens' ``accumulated_resid(apply_ln=True)`` and
tuned-lens's ``LogitLens`` decode (nostalgebraist's original logit lens), so
its numbers compare with the literature; the primary ``norm`` lens instead
uses the norm the model applies next, which is the baseline's contract.
"""

from __future__ import annotations

from torch import Tensor

from lens.lenses.base import Lens, LensParts
from lens.norms import NormSpec
from lens.unembed import Unembed


class LogitLens(Lens):
    """``unembed(final_norm(resid))`` at every layer."""

    name = "logit"

    def __init__(self, unembed: Unembed, final_norm: NormSpec) -> None:
        super().__init__(unembed)
        self.final_norm = final_norm

    @classmethod
    def from_parts(cls, parts: LensParts) -> LogitLens:
        return cls(parts.unembed, parts.norms[-1])

    def transform(self, resid: Tensor, layer: int) -> Tensor:
        return self.final_norm(resid)
