"""Prism sidecar lens (README, Prism): the fitting maths, the artifacts, and ``PrismLens``.

Prism decodes the residual through the model's own norm, then a diagonal
whitening and one orthogonal map ``Q`` fitted to the unembedding::

    logits = ((norm(resid) − μ) / sqrt(var + eps)) @ Q @ W_U + b_U

Shapes and conventions (row vectors, as everywhere in lens):

- ``mean``, ``var``: (d_model,) per-feature moments of the normalised residuals
  at the sampled depths, pooled over depths (one whitening, one ``Q``).
- ``E_k``: (d_model, k), columns = the top-k principal axes of the whitened sample.
- ``U_k``: (d_model, k), columns = the top-k left singular vectors of
  ``W_U`` (d_model, d_vocab).
- ``Q``: (d_model, d_model) orthogonal, applied as ``z @ Q``; it is the
  Procrustes map that sends axis ``e_i`` to ``u_i`` (``E_kᵀ Q ≈ U_kᵀ``). The usual
  statement writes it for column vectors, ``U Vᵀ`` from ``svd(U_k E_kᵀ)``; ours is its
  transpose, computed as ``U Vᵀ`` from ``svd(E_k U_kᵀ)``.

The fitting CLI is ``lens.prism_fit`` and its maths ``lens.prism_maths``; this
module holds the artifacts and the lens, everything a run needs. A set is
refused, with one line, when it belongs to another model or is not one fit's
files (``lens.artifacts``); ``--prism auto`` also refuses a set whose held-out
verdict says it does not beat the logit lens, which ``on`` uses with a warning.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lens import fitted
from lens.artifacts import (
    PROVENANCE_FILE,
    ModelFacts,
    belongs,
    file_hashes,
    hash_mismatch,
    read_provenance,
    write_set,
)
from lens.config import RunConfig
from lens.errors import LensError, first_line
from lens.fitted import FittedKind
from lens.lenses import Lens, Resolution
from lens.norms import NormSpec
from lens.prism_maths import orthogonality_error
from lens.unembed import Unembed
from lens.writers import json_bytes

if TYPE_CHECKING:
    from lens.model import LoadedModel

DEFAULT_DIR = Path("prisms")
WHITEN_FILE = "whiten.pt"
Q_FILE = "Q_prism.pt"
ARTIFACT_FILES = (WHITEN_FILE, Q_FILE, PROVENANCE_FILE)
EPS = 1e-8
ORTHO_ACCEPT = 1e-2
"""Refuse artifacts whose stored ``Q`` is further than this from orthogonal."""
FIT_HINT = "fit them with python -m lens.prism_fit MODEL --prism-dir DIR"


class PrismError(LensError):
    """Missing, unreadable or incompatible Prism artifacts (one line naming the path)."""


# --------------------------------------------------------------------------- artifacts


@dataclass(frozen=True, eq=False)
class PrismArtifacts:
    """What ``whiten.pt``, ``Q_prism.pt`` and ``provenance.json`` hold."""

    mean: Tensor
    """(d_model,)"""
    var: Tensor
    """(d_model,)"""
    eps: float
    Q: Tensor
    """(d_model, d_model) orthogonal, applied as ``whitened @ Q``."""
    provenance: dict[str, Any]

    @property
    def d_model(self) -> int:
        return int(self.Q.shape[0])

    @property
    def k(self) -> int | None:
        k = self.provenance.get("k")
        return k if isinstance(k, int) and not isinstance(k, bool) else None

    @property
    def layers(self) -> list[int] | None:
        layers = self.provenance.get("layers")
        if isinstance(layers, list) and all(isinstance(x, int) for x in layers):
            return list(layers)
        return None

    def save(self, directory: Path) -> None:
        """Write the three files at once (``lens.artifacts.write_set``), hashed in provenance."""
        files = {}
        for name, obj in ((WHITEN_FILE, {"mean": self.mean, "var": self.var, "eps": self.eps}),
                          (Q_FILE, self.Q)):
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            files[name] = buffer.getvalue()
        files[PROVENANCE_FILE] = json_bytes({**self.provenance, "files": file_hashes(files)})
        write_set(directory, files)


def artifact_dir(config: RunConfig, name: str) -> Path:
    """``<prism_dir>/<name>/`` (``prism_dir`` defaults to ``prisms/`` in the current directory)."""
    return (config.prism_dir or DEFAULT_DIR) / name


def artifacts_present(path: Path) -> bool:
    return all((path / f).is_file() for f in ARTIFACT_FILES)


def _load_tensor_file(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line
        raise PrismError(f"cannot read {file} (truncated or not a torch file: "
                         f"{first_line(exc)}); refit: {FIT_HINT}") from None


def _vector(value: Any, file: Path, key: str) -> Tensor:
    if not isinstance(value, Tensor) or value.ndim != 1 or not value.is_floating_point():
        raise PrismError(f"{file}: '{key}' must be a 1-D float tensor; refit: {FIT_HINT}")
    if not bool(torch.isfinite(value).all()):
        raise PrismError(f"{file}: '{key}' has non-finite values; refit: {FIT_HINT}")
    return value


def load_artifacts(path: Path) -> PrismArtifacts:
    """Read and validate the artifacts under ``path`` on their own (no model needed).

    Raises:
        PrismError: one line naming the file and what is wrong: missing files,
            a truncated ``.pt``, invalid ``provenance.json``, inconsistent
            shapes, a ``Q`` that is not orthogonal, or files that are not the
            ones the provenance's sha256s name (a mixed set).
    """
    missing = [f for f in ARTIFACT_FILES if not (path / f).is_file()]
    if len(missing) == len(ARTIFACT_FILES):
        raise PrismError(f"no Prism artifacts at {path}")
    if missing:
        raise PrismError(f"incomplete Prism artifacts at {path}: missing {', '.join(missing)}")
    w = _load_tensor_file(path / WHITEN_FILE)
    if not isinstance(w, dict) or not {"mean", "var", "eps"} <= w.keys():
        raise PrismError(f"{path / WHITEN_FILE} must hold {{mean, var, eps}}; refit: {FIT_HINT}")
    mean = _vector(w["mean"], path / WHITEN_FILE, "mean")
    var = _vector(w["var"], path / WHITEN_FILE, "var")
    eps = w["eps"]
    if isinstance(eps, Tensor) and eps.numel() == 1:
        eps = float(eps)
    if (not isinstance(eps, float | int) or isinstance(eps, bool) or not math.isfinite(eps)
            or eps < 0):
        raise PrismError(f"{path / WHITEN_FILE}: 'eps' must be a finite number >= 0")
    if bool((var < 0).any()) or (eps == 0 and bool((var == 0).any())):
        raise PrismError(f"{path / WHITEN_FILE}: 'var' must be positive; refit: {FIT_HINT}")
    Q = _load_tensor_file(path / Q_FILE)
    if (not isinstance(Q, Tensor) or Q.ndim != 2 or Q.shape[0] != Q.shape[1]
            or not Q.is_floating_point()):
        raise PrismError(f"{path / Q_FILE} must hold one square float matrix; refit: {FIT_HINT}")
    if not bool(torch.isfinite(Q).all()):
        raise PrismError(f"{path / Q_FILE} has non-finite values; refit: {FIT_HINT}")
    if mean.shape[0] != Q.shape[0] or var.shape[0] != Q.shape[0]:
        raise PrismError(f"Prism artifacts at {path} disagree: whitening d {mean.shape[0]}/"
                         f"{var.shape[0]} vs Q {Q.shape[0]}; refit: {FIT_HINT}")
    error = orthogonality_error(Q)
    if error > ORTHO_ACCEPT:
        raise PrismError(f"{path / Q_FILE} is not orthogonal (‖QᵀQ − I‖ = {error:.3g}); "
                         f"refit: {FIT_HINT}")
    try:
        provenance = read_provenance(path / PROVENANCE_FILE)
    except ValueError as exc:
        raise PrismError(f"{exc}; refit: {FIT_HINT}") from None
    if problem := hash_mismatch(path, provenance.get("files")):
        raise PrismError(f"Prism artifacts at {path}: {problem}; refit: {FIT_HINT}")
    return PrismArtifacts(mean=mean, var=var, eps=float(eps), Q=Q, provenance=provenance)


# --------------------------------------------------------------------------- the lens


class PrismLens(Lens):
    """The model's norm, then whitening and ``Q``, then the same unembedding (README, Prism)."""

    name = "prism"

    def __init__(self, unembed: Unembed, norms: Sequence[NormSpec],
                 artifacts: PrismArtifacts) -> None:
        super().__init__(unembed)
        self.norms = tuple(norms)
        self.artifacts = artifacts
        self._params: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(mean, sqrt(var + eps), Q) in the unembedding dtype on ``device``, made once."""
        if device not in self._params:
            a, dt = self.artifacts, self.unembed.dtype
            var = a.var.to(device=device, dtype=dt)
            self._params[device] = (a.mean.to(device=device, dtype=dt),
                                    torch.sqrt(var + a.eps), a.Q.to(device=device, dtype=dt))
        return self._params[device]

    def transform(self, resid: Tensor, layer: int) -> Tensor:
        """(seq, d_model) → (seq, d_model): ``((norm(resid) − μ) / sqrt(var + eps)) @ Q``."""
        mean, std, Q = self._on(resid.device)
        x = self.norms[layer](resid).to(Q.dtype)
        with torch.no_grad():
            return ((x - mean) / std) @ Q


def _check(artifacts: PrismArtifacts, facts: ModelFacts, path: Path) -> str | None:
    """Refuse a set fitted on another model (``PrismError``); return a warning or None."""
    problem, warning = belongs(artifacts.provenance, facts)
    if artifacts.d_model != facts.d_model:  # what the files hold, whatever the provenance says
        problem, warning = f"Q is for d_model {artifacts.d_model} vs {facts.d_model}", None
    if problem:
        raise PrismError(f"Prism artifacts at {path}: {problem}; refit: {FIT_HINT}")
    return warning


KIND = FittedKind(
    mode_field="prism", label="Prism artifacts", error=PrismError, fit_hint=FIT_HINT,
    directory=artifact_dir, present=artifacts_present, load=load_artifacts, check=_check,
    build=lambda artifacts, unembed, norms: PrismLens(unembed, norms, artifacts),
    details=lambda artifacts: {"k": artifacts.k, "layers": artifacts.layers},
    blank=("k", "layers"))
"""Prism as a fitted lens (``lens.fitted``: ``--prism auto|on|off``)."""


def resolve_prism(config: RunConfig, *, name: str, model: LoadedModel, unembed: Unembed,
                  norms: Sequence[NormSpec]) -> Resolution:
    """Apply ``--prism auto|on|off`` before any pass runs (``lens.fitted.resolve``)."""
    return fitted.resolve(KIND, config, name=name, model=model, unembed=unembed, norms=norms)


def precheck(config: RunConfig, name: str) -> None:
    """``--prism on``: fail before the model loads when the artifacts are unusable."""
    fitted.precheck(KIND, config, name)
