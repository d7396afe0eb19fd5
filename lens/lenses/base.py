"""The ``Lens`` base: an interchangeable decoder of a residual stream into logits.

A lens maps the residual after ``layer`` to the vector that goes through the
unembedding (``transform``); ``forward`` and ``decode`` add the unembedding.
A lens is built from ``LensParts`` (the loaded model's pieces and the run
config) by a resolver, ``parts -> Resolution``; ``Lens.resolve`` is the
resolver of a lens that needs nothing fitted, and a fitted lens (Prism, tuned)
brings its own, which also says why it is not used. The registry that names
the resolvers is ``lens.lenses.registry``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from lens.norms import NormSpec
from lens.unembed import Unembed

if TYPE_CHECKING:
    from lens.config import RunConfig
    from lens.model import LoadedModel


class Lens(ABC):
    """Decode residuals: ``forward(resid, layer) -> logits``.

    A subclass sets ``name`` (its records' ``lens`` and its files' suffix) and
    ``transform``; one that needs more than the unembedding overrides
    ``from_parts``.
    """

    name: ClassVar[str]

    def __init__(self, unembed: Unembed) -> None:
        self.unembed = unembed

    @abstractmethod
    def transform(self, resid: Tensor, layer: int) -> Tensor:
        """(seq, d_model) residual → (seq, d) input of the unembedding."""

    def forward(self, resid: Tensor, layer: int) -> Tensor:
        """(seq, d_model) → (seq, d_vocab) logits in the unembedding dtype."""
        return self.unembed(self.transform(resid, layer))

    def decode_rows(self, rows: Sequence[tuple[Tensor, int]]) -> Tensor:
        """Residual rows of any layers in one matmul: ``[(resid (d_model,), layer)]`` →
        (len(rows), vocab) logits, each row as ``forward`` decodes it."""
        return self.unembed(torch.stack([self.transform(r[None], layer)[0] for r, layer in rows]))

    def decode(self, resids: Tensor, layers: Sequence[int], *,
               out: Tensor | None = None) -> Tensor:
        """Many layers in one matmul: (len(layers), seq, d_model) → (len(layers), seq, vocab).

        ``out``: a buffer for the logits (``Unembed.__call__``).
        """
        inputs = torch.stack([self.transform(r, layer)
                              for r, layer in zip(resids, layers, strict=True)])
        return self.unembed(inputs, out=out)

    @classmethod
    def from_parts(cls, parts: LensParts) -> Lens:
        """This lens for one loaded model (the default needs only the unembedding)."""
        return cls(parts.unembed)

    @classmethod
    def resolve(cls, parts: LensParts) -> Resolution:
        """The resolver of a lens that needs nothing fitted: always usable, no summary."""
        return Resolution(cls.from_parts(parts))


@dataclass(frozen=True, eq=False)
class LensParts:
    """What a lens is built from: the loaded model's pieces and the run config."""

    config: RunConfig
    name: str
    """The model's file-name stem (fitted lenses keep their artifacts under it)."""
    model: LoadedModel
    unembed: Unembed
    norms: tuple[NormSpec, ...]
    """The norm the model applies after each layer 0..n; ``norms[-1]`` is the final norm."""

    @property
    def d_model(self) -> int:
        return self.model.d_model

    @property
    def n_layers(self) -> int:
        return self.model.n_layers


@dataclass(frozen=True, eq=False)
class Resolution:
    """A resolver's answer: the lens to decode with (None: skipped) and its summary.

    ``summary`` becomes ``diagnostics.<lens>_summary`` (a fitted lens says there
    which artifacts it used or why it was skipped); None writes nothing.
    """

    lens: Lens | None
    summary: Mapping[str, Any] | None = None
