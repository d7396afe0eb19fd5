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

The fitting CLI is ``lens.prism_fit``; this module holds everything the run
needs and the pure pieces the fit is made of.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lens.config import RunConfig
from lens.errors import LensError, first_line
from lens.lenses import Lens
from lens.norms import NormSpec
from lens.unembed import Unembed
from lens.writers import json_bytes, write_atomic

DEFAULT_DIR = Path("prisms")
WHITEN_FILE = "whiten.pt"
Q_FILE = "Q_prism.pt"
PROVENANCE_FILE = "provenance.json"
ARTIFACT_FILES = (WHITEN_FILE, Q_FILE, PROVENANCE_FILE)
EPS = 1e-8
ORTHO_REFIT = 1e-3
"""Re-orthonormalise ``Q`` by QR when ``‖QᵀQ − I‖_F`` exceeds this (README, Prism)."""
ORTHO_ACCEPT = 1e-2
"""Refuse artifacts whose stored ``Q`` is further than this from orthogonal."""
FIT_HINT = "fit them with python -m lens.prism_fit MODEL --prism-dir DIR"


class PrismError(LensError):
    """Missing, unreadable or incompatible Prism artifacts (one line naming the path)."""


# --------------------------------------------------------------------------- fitting maths


class RunningMoments:
    """Per-feature mean and population variance over batches (Chan et al.'s parallel Welford).

    Merging batch moments keeps the error of a long stream at the level of one
    batch, unlike running sums of squares. ``dtype`` is float32 for float32 and
    half-precision models (README, Prism) and float64 for float64 models.
    """

    def __init__(self, d: int, *, dtype: torch.dtype = torch.float32) -> None:
        self.count = 0
        self.mean = torch.zeros(d, dtype=dtype)
        self.m2 = torch.zeros(d, dtype=dtype)

    def update(self, batch: Tensor) -> None:
        """Add the rows of ``batch`` (n, d)."""
        x = batch.detach().to(device="cpu", dtype=self.mean.dtype)
        n_b = int(x.shape[0])
        if n_b == 0:
            return
        mean_b = x.mean(dim=0)
        m2_b = (x - mean_b).pow(2).sum(dim=0)
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.pow(2) * (self.count * n_b / n)
        self.count = n

    @property
    def var(self) -> Tensor:
        """(d,) population variance (divides by n), the whitening's denominator."""
        if self.count == 0:
            raise ValueError("no data: variance of an empty stream")
        return self.m2 / self.count


class Reservoir:
    """A uniform sample of at most ``capacity`` rows of a stream (Algorithm R, seeded).

    Rows arrive in batches; row ``t`` of the stream (0-based) replaces a random
    slot with probability ``capacity / (t + 1)`` once the reservoir is full.
    The same stream and seed always give the same sample.
    """

    def __init__(self, capacity: int, *, seed: int, dtype: torch.dtype = torch.float32) -> None:
        if capacity < 1:
            raise ValueError(f"reservoir capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.dtype = dtype
        self.seen = 0
        self._chunks: list[Tensor] = []
        self._full: Tensor | None = None
        self._gen = torch.Generator().manual_seed(seed)

    def add(self, batch: Tensor) -> None:
        x = batch.detach().to(device="cpu", dtype=self.dtype)
        if self._full is None:
            kept = sum(int(c.shape[0]) for c in self._chunks)
            take = min(self.capacity - kept, int(x.shape[0]))
            if take:
                self._chunks.append(x[:take].clone())
            self.seen += take
            x = x[take:]
            if kept + take < self.capacity:
                return
            self._full = torch.cat(self._chunks)
            self._chunks = []
        if x.shape[0] == 0:
            return
        t = torch.arange(self.seen, self.seen + x.shape[0], dtype=torch.float64)
        slots = (torch.rand(x.shape[0], generator=self._gen, dtype=torch.float64) * (t + 1)).long()
        self.seen += int(x.shape[0])
        for row, slot in enumerate(slots.tolist()):
            if slot < self.capacity:
                self._full[slot] = x[row]

    def sample(self) -> Tensor:
        """(min(seen, capacity), d) the rows kept."""
        if self._full is not None:
            return self._full.clone()
        if not self._chunks:
            raise ValueError("empty reservoir")
        return torch.cat(self._chunks)


def whiten(x: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    """Diagonal whitening ``(x − mean) / sqrt(var + eps)``, (..., d) → (..., d)."""
    return (x - mean) / torch.sqrt(var + eps)


def _fix_signs(columns: Tensor) -> Tensor:
    """Flip each column so that its largest-magnitude entry is positive (deterministic bases)."""
    idx = columns.abs().argmax(dim=0)
    signs = torch.sign(columns[idx, torch.arange(columns.shape[1])])
    return columns * torch.where(signs == 0, torch.ones_like(signs), signs)


def principal_axes(sample: Tensor, k: int) -> Tensor:
    """(n, d) sample → (d, k): unit columns along its k directions of largest variance."""
    z = sample.to(torch.float64)
    zc = z - z.mean(dim=0)
    evals, evecs = torch.linalg.eigh(zc.T @ zc / max(1, z.shape[0]))
    order = torch.argsort(evals, descending=True, stable=True)[:k]
    return _fix_signs(evecs[:, order])


def unembedding_basis(W_U: Tensor) -> tuple[Tensor, int]:
    """(d, V) unembedding → ((d, min(d, V)) left singular vectors, by descending σ; rank).

    Through a QR of ``W_Uᵀ`` in float64: ``W_U = Rᵀ Q₁ᵀ``, so ``W_U`` has the
    left singular vectors and singular values of the small (d, d) ``Rᵀ``.
    That is stable (unlike the Gram matrix ``W_U W_Uᵀ``, which squares the
    condition number and blurs the rank) and an order of magnitude faster than
    an SVD of the (d, V) matrix. The rank uses the usual tolerance
    ``σ_max · max(d, V) · eps(dtype of W_U)``.
    """
    W = W_U.detach().to(device="cpu", dtype=torch.float64)
    R = torch.linalg.qr(W.T, mode="r").R
    U, sv, _ = torch.linalg.svd(R.T)
    eps = torch.finfo(W_U.dtype).eps if W_U.is_floating_point() else 2.0**-52
    tol = float(sv[0]) * max(W.shape) * eps
    return _fix_signs(U), int((sv > tol).sum())


def orthogonality_error(Q: Tensor) -> float:
    """‖QᵀQ − I‖ (Frobenius) of a square matrix."""
    q = Q.to(torch.float64)
    return float(torch.linalg.matrix_norm(q.T @ q - torch.eye(q.shape[0], dtype=torch.float64)))


def procrustes(E_k: Tensor, U_k: Tensor) -> tuple[Tensor, bool]:
    """The orthogonal (d, d) ``Q`` minimising ``‖E_kᵀ Q − U_kᵀ‖_F``, and if QR was needed.

    Args:
        E_k: (d, k) orthonormal columns (principal axes of the whitened sample).
        U_k: (d, k) orthonormal columns (left singular vectors of ``W_U``).

    ``Q = U Vᵀ`` with ``U S Vᵀ = svd(E_k U_kᵀ)``; re-orthonormalised by QR
    (columns signed so that ``R`` has a positive diagonal) when
    ``‖QᵀQ − I‖ > 1e-3``.
    """
    if E_k.shape != U_k.shape:
        raise ValueError(f"E_k {tuple(E_k.shape)} and U_k {tuple(U_k.shape)} differ in shape")
    M = E_k.to(torch.float64) @ U_k.to(torch.float64).T
    U, _, Vh = torch.linalg.svd(M)
    Q = U @ Vh
    if orthogonality_error(Q) <= ORTHO_REFIT:
        return Q, False
    return reorthonormalise(Q), True


def reorthonormalise(Q: Tensor) -> Tensor:
    """The orthogonal factor of ``Q = QR``, columns signed so that ``diag(R) > 0``."""
    q, r = torch.linalg.qr(Q.to(torch.float64))
    signs = torch.sign(torch.diagonal(r))
    return q * torch.where(signs == 0, torch.ones_like(signs), signs)


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
        """Write the three files atomically into ``directory`` (created if needed)."""
        directory.mkdir(parents=True, exist_ok=True)
        for name, obj in ((WHITEN_FILE, {"mean": self.mean, "var": self.var, "eps": self.eps}),
                          (Q_FILE, self.Q)):
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            write_atomic(directory / name, buffer.getvalue())
        write_atomic(directory / PROVENANCE_FILE, json_bytes(self.provenance))


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


def load_artifacts(path: Path, *, d_model: int | None = None,
                   model: str = "the model") -> PrismArtifacts:
    """Read and validate the artifacts under ``path``.

    Raises:
        PrismError: one line naming the file and what is wrong: missing files,
            a truncated ``.pt``, invalid ``provenance.json``, inconsistent
            shapes, a ``Q`` that is not orthogonal, or ``d_model`` differing
            from ``d_model`` (``d_model 16 vs 32``: artifacts vs model).
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
        provenance = json.loads((path / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrismError(f"invalid {path / PROVENANCE_FILE}: {first_line(exc)}; "
                         f"refit: {FIT_HINT}") from None
    if not isinstance(provenance, dict):
        raise PrismError(f"invalid {path / PROVENANCE_FILE}: expected a JSON object; "
                         f"refit: {FIT_HINT}")
    if d_model is not None and Q.shape[0] != d_model:
        raise PrismError(f"Prism artifacts at {path} do not fit {model}: "
                         f"d_model {Q.shape[0]} vs {d_model}")
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


@dataclass(frozen=True, eq=False)
class PrismResolution:
    """The sidecar lens to decode with (or None) and ``diagnostics.prism_summary``."""

    lens: PrismLens | None
    summary: dict[str, Any]


def resolve_prism(config: RunConfig, *, name: str, d_model: int, unembed: Unembed,
                  norms: Sequence[NormSpec]) -> PrismResolution:
    """Apply ``--prism auto|on|off`` before any pass runs.

    ``auto`` uses compatible artifacts and otherwise records why not in
    ``summary["error"]``; ``on`` raises ``LensError`` (one line naming the
    path) where ``auto`` would record an error; ``off`` looks at nothing
    beyond whether the files exist.
    """
    path = artifact_dir(config, name)
    summary: dict[str, Any] = {"mode": config.prism, "artifact_path": str(path),
                               "present": artifacts_present(path), "compatible": False,
                               "k": None, "layers": None, "error": None}
    if config.prism == "off":
        return PrismResolution(None, summary)
    try:
        artifacts = load_artifacts(path, d_model=d_model, model=name)
    except PrismError as exc:
        if config.prism == "on":
            raise _on_error(exc) from None
        summary["error"] = str(exc)
        return PrismResolution(None, summary)
    summary.update(compatible=True, k=artifacts.k, layers=artifacts.layers)
    return PrismResolution(PrismLens(unembed, norms, artifacts), summary)


def _on_error(exc: PrismError) -> LensError:
    hint = "" if "refit" in str(exc) else f"; {FIT_HINT} or use --prism auto"
    return LensError(f"--prism on: {exc}{hint}")


def precheck(config: RunConfig, name: str) -> None:
    """``--prism on``: fail before a (possibly slow) model load when the artifacts are unusable.

    Only what needs no model is checked here (files, readability, shapes);
    ``resolve_prism`` checks ``d_model`` once the model is loaded.
    """
    if config.prism != "on":
        return
    try:
        load_artifacts(artifact_dir(config, name))
    except PrismError as exc:
        raise _on_error(exc) from None
