"""Prism sidecar lens (SPEC §7): artifacts discovery. Fitting lands with its own issue."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lens.config import RunConfig
from lens.errors import LensError

DEFAULT_DIR = Path("prisms")


def prism_summary(config: RunConfig, model: Any) -> dict[str, Any]:
    """``diagnostics.prism_summary``: whether Prism artifacts were found and used."""
    path = (config.prism_dir or DEFAULT_DIR) / model.name
    present = (path / "Q_prism.pt").exists() and (path / "whiten.pt").exists()
    error = None
    if config.prism == "off":
        error = None
    elif not present:
        error = f"no Prism artifacts at {path}"
    else:
        error = "Prism decoding is not available in this version of lens"
    if config.prism == "on":
        raise LensError(f"--prism on: {error}; fit them first or use --prism auto")
    return {"mode": config.prism, "artifact_path": str(path), "present": present,
            "compatible": False, "k": None, "layers": None, "error": error}
