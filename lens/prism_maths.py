"""The Prism fit's maths: streamed moments, a seeded reservoir, principal axes, Procrustes.

Pure functions of tensors (no model, no files), used by ``lens.prism_fit``;
``lens.prism`` holds the artifacts and the lens. Conventions as there: row
vectors, ``Q`` applied as ``whitened @ Q``.
"""

from __future__ import annotations

import torch
from torch import Tensor

ORTHO_REFIT = 1e-3
"""Re-orthonormalise ``Q`` by QR when ``‖QᵀQ − I‖_F`` exceeds this (README, Prism)."""


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
