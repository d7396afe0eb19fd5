"""lens: a layer-by-layer logit-lens analysis harness for causal language models.

The public API is exactly ``__all__``: load a model, run a probe on it, get the
records (plain frozen dataclasses) or a DataFrame of them, write the files the
CLI writes; plus the extension points (``Lens``, ``Emitter``, ``check_emitter``).
Names resolve lazily from their home modules, so ``import lens`` (and
``python -m lens.run --help``) stays light: torch loads on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_HOME = {
    # configuration and probes
    "RunConfig": "lens.config",
    "Probe": "lens.probe",
    "Fact": "lens.probe",
    "default_probe": "lens.probe",
    "load_probe": "lens.probe",
    "LensError": "lens.errors",
    # a model, a run, its files
    "load_model": "lens.model",
    "LoadedModel": "lens.model",
    "run_probe": "lens.api",
    "ModelRun": "lens.report",
    "write_outputs": "lens.api",
    # records as plain values
    "Record": "lens.emitters",
    "PositionRecord": "lens.emitters",
    "NextTokenRecord": "lens.emitters",
    "RawCheckRecord": "lens.emitters",
    "ConsistencyRecord": "lens.emitters",
    "to_pandas": "lens.api",
    # extension points: lenses and emitters
    "Lens": "lens.lenses",
    "NormLens": "lens.lenses",
    "RawLens": "lens.lenses",
    "PrismLens": "lens.prism",
    "Emitter": "lens.emitters",
    "LayerStep": "lens.emitters",
    "check_emitter": "lens.emitters",
}
"""Public name → the module that defines it (the one table to re-point when code moves)."""

__all__ = [
    "__version__",
    "RunConfig", "Probe", "Fact", "default_probe", "load_probe", "LensError",
    "load_model", "LoadedModel", "run_probe", "ModelRun", "write_outputs",
    "Record", "PositionRecord", "NextTokenRecord", "RawCheckRecord", "ConsistencyRecord",
    "to_pandas",
    "Lens", "NormLens", "RawLens", "PrismLens", "Emitter", "LayerStep", "check_emitter",
]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'lens' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names only (submodules such as ``lens.run`` stay importable)."""
    return sorted(__all__)


if TYPE_CHECKING:
    from lens.api import run_probe, to_pandas, write_outputs
    from lens.config import RunConfig
    from lens.emitters import (
        ConsistencyRecord,
        Emitter,
        LayerStep,
        NextTokenRecord,
        PositionRecord,
        RawCheckRecord,
        Record,
        check_emitter,
    )
    from lens.errors import LensError
    from lens.lenses import Lens, NormLens, RawLens
    from lens.model import LoadedModel, load_model
    from lens.prism import PrismLens
    from lens.probe import Fact, Probe, default_probe, load_probe
    from lens.report import ModelRun
