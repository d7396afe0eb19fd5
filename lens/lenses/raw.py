"""The raw lens: the residual straight into the unembedding, no normalisation."""

from __future__ import annotations

from torch import Tensor

from lens.lenses.base import Lens


class RawLens(Lens):
    """What a lens shows without any norm: the lens-artifact check compares against it."""

    name = "raw"

    def transform(self, resid: Tensor, layer: int) -> Tensor:
        return resid
