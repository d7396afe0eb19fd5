"""The primary lens: each layer normalised by the module the model applies next (SPEC §2)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from lens.lenses.base import Lens, LensParts
from lens.norms import NormSpec
from lens.unembed import Unembed


class NormLens(Lens):
    """Normalise with the module the model applies next (the next block's ln1), then unembed."""

    name = "norm"

    def __init__(self, unembed: Unembed, norms: Sequence[NormSpec]) -> None:
        super().__init__(unembed)
        self.norms = tuple(norms)

    @classmethod
    def from_parts(cls, parts: LensParts) -> NormLens:
        return cls(parts.unembed, parts.norms)

    def transform(self, resid: Tensor, layer: int) -> Tensor:
        return self.norms[layer](resid)
