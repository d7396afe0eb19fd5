"""Lenses: interchangeable decoders of a residual stream into logits, and their registry.

``NormLens`` is the primary lens (SPEC §2). The sidecar lenses ``--lenses``
chooses are in ``lens.lenses.registry.LENSES``: ``logit`` (the standard logit
lens), ``tuned`` and ``prism`` (fitted; used when their artifacts fit the
model) and ``raw``. A new lens is a ``Lens`` subclass plus one registry line.
"""

from lens.lenses.base import Lens, LensParts, Resolution
from lens.lenses.logit import LogitLens
from lens.lenses.norm import NormLens
from lens.lenses.raw import RawLens
from lens.lenses.registry import LENSES, PRIMARY, check_lens_names, fitted, resolve_lenses

__all__ = ["LENSES", "PRIMARY", "Lens", "LensParts", "LogitLens", "NormLens", "RawLens",
           "Resolution", "check_lens_names", "fitted", "resolve_lenses"]
