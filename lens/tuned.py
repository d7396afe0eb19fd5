"""The tuned lens (Belrose et al. 2023): per-layer affine translators, then the model's head.

For every layer ℓ below the last, a translator is added residually,
``h ↦ h + h Aᵀ_ℓ + b_ℓ``, and the result goes through the model's *final* norm
and the unembedding; the last layer (ℓ = n) is decoded as is, so it is the
model's own head. With A = 0 and b = 0 the tuned lens is the logit lens.

Artifacts use the ``tuned-lens`` package's on-disk format, so lenses trained by
that package load here and ours load there: a folder ``<tuned_dir>/<name>/``
with ``config.json`` (``TunedLensConfig``: ``base_model_name_or_path``,
``d_model``, ``num_hidden_layers``, ``bias``, ``base_model_revision``,
``unembed_hash``, ``lens_type``) and ``params.pt`` (the state dict of a
``ModuleList`` of ``nn.Linear(d_model, d_model)``: ``{i}.weight``, ``{i}.bias``
for i < n). Our fit adds ``provenance.json`` (the package ignores other files):
the model's facts (``lens.artifacts.ModelFacts``), the training settings, the
held-out KL table and a sha256 of the two other files. A package-made folder
has no provenance; it is checked on what its ``config.json`` records
(``d_model``, layer count, unembedding hash, model name) and ``params.pt``'s shapes.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
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
    id_warning,
    mismatches,
    read_provenance,
    write_set,
)
from lens.config import RunConfig
from lens.errors import LensError, first_line
from lens.fitted import FittedKind
from lens.lenses import Lens, Resolution
from lens.norms import NormSpec
from lens.unembed import Unembed

if TYPE_CHECKING:
    from lens.model import LoadedModel

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.pt"
DEFAULT_DIR = Path("tuned")
LENS_TYPE = "linear_tuned_lens"
FIT_HINT = "fit them with python -m lens.tuned_fit MODEL --tuned-dir DIR"


class TunedError(LensError):
    """Missing, unreadable or incompatible tuned-lens artifacts (one line naming the path)."""


@dataclass(frozen=True, eq=False)
class TunedArtifacts:
    """One translator per layer below the last, as ``nn.Linear`` holds it."""

    weight: Tensor
    """(n_layers, d_model, d_model): translator ℓ adds ``h @ weight[ℓ].T + bias[ℓ]``."""
    bias: Tensor | None
    """(n_layers, d_model), or None for a package lens trained with ``bias=False``."""
    config: dict[str, Any]
    """``config.json``: the package's ``TunedLensConfig`` fields."""
    provenance: dict[str, Any] | None = None
    """``provenance.json`` (None for a lens trained by the tuned-lens package)."""

    @property
    def n_layers(self) -> int:
        return int(self.weight.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.weight.shape[-1])

    @classmethod
    def identity(cls, facts: ModelFacts, *, provenance: dict[str, Any] | None = None,
                 dtype: torch.dtype = torch.float32) -> TunedArtifacts:
        """A = 0, b = 0 at every layer (the logit lens), where every fit starts."""
        n, d = facts.n_layers, facts.d_model
        return cls(weight=torch.zeros(n, d, d, dtype=dtype), bias=torch.zeros(n, d, dtype=dtype),
                   config=package_config(facts), provenance=provenance)

    def state_dict(self) -> dict[str, Tensor]:
        """``params.pt``: ``{i}.weight`` (d, d) and ``{i}.bias`` (d,), separate tensors."""
        state: dict[str, Tensor] = {}
        for i in range(self.n_layers):
            state[f"{i}.weight"] = self.weight[i].detach().clone().contiguous()
            if self.bias is not None:
                state[f"{i}.bias"] = self.bias[i].detach().clone().contiguous()
        return state

    def save(self, directory: Path) -> None:
        """Write the set at once (``lens.artifacts.write_set``); the provenance hashes the rest."""
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        files = {PARAMS_FILE: buffer.getvalue(),
                 CONFIG_FILE: json.dumps(self.config, indent=2).encode("utf-8")}
        if self.provenance is not None:
            provenance = {**self.provenance, "files": file_hashes(files)}
            files[PROVENANCE_FILE] = json.dumps(provenance, indent=2, allow_nan=False).encode()
        write_set(directory, files)


def package_config(facts: ModelFacts) -> dict[str, Any]:
    """``config.json`` exactly as the package's ``TunedLensConfig.to_dict()`` writes it."""
    return {"base_model_name_or_path": facts.model_id, "d_model": facts.d_model,
            "num_hidden_layers": facts.n_layers, "bias": True, "base_model_revision": None,
            "unembed_hash": facts.unembed_hash, "lens_type": LENS_TYPE}


def artifact_dir(config: RunConfig, name: str) -> Path:
    """``<tuned_dir>/<name>/`` (``tuned_dir`` defaults to ``tuned/`` in the current directory)."""
    return (config.tuned_dir or DEFAULT_DIR) / name


def artifacts_present(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_FILE).is_file()


def _int(config: Mapping[str, Any], key: str, file: Path) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TunedError(f"{file}: '{key}' must be a positive integer; refit: {FIT_HINT}")
    return value


def load_artifacts(path: Path) -> TunedArtifacts:
    """Read and validate the set under ``path`` on its own (no model needed).

    Raises:
        TunedError: one line naming the file and what is wrong: missing files,
            an unreadable ``config.json`` or ``params.pt``, keys or shapes that
            disagree with the config, non-finite values, or (with a provenance)
            files that do not match its sha256s.
    """
    present = [f for f in (CONFIG_FILE, PARAMS_FILE) if (path / f).is_file()]
    if not present:
        raise TunedError(f"no tuned-lens artifacts at {path}")
    if len(present) == 1:
        missing = PARAMS_FILE if present == [CONFIG_FILE] else CONFIG_FILE
        raise TunedError(f"incomplete tuned-lens artifacts at {path}: missing {missing}")
    try:
        config = read_provenance(path / CONFIG_FILE)
        provenance = (read_provenance(path / PROVENANCE_FILE)
                      if (path / PROVENANCE_FILE).exists() else None)
    except ValueError as exc:
        raise TunedError(f"{exc}; refit: {FIT_HINT}") from None
    if provenance is not None and (problem := hash_mismatch(path, provenance.get("files"))):
        raise TunedError(f"tuned-lens artifacts at {path}: {problem}; refit: {FIT_HINT}")
    if config.get("lens_type", LENS_TYPE) != LENS_TYPE:
        raise TunedError(f"{path / CONFIG_FILE}: lens_type {config.get('lens_type')!r} is not "
                         f"{LENS_TYPE!r}")
    n, d = _int(config, "num_hidden_layers", path / CONFIG_FILE), _int(config, "d_model",
                                                                         path / CONFIG_FILE)
    with_bias = config.get("bias", True) is not False
    try:
        state = torch.load(path / PARAMS_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line
        raise TunedError(f"cannot read {path / PARAMS_FILE} (truncated or not a torch file: "
                         f"{first_line(exc)}); refit: {FIT_HINT}") from None
    expected = {f"{i}.{k}" for i in range(n) for k in (("weight", "bias") if with_bias
                                                       else ("weight",))}
    if not isinstance(state, dict) or set(state) != expected:
        got = sorted(state)[:4] if isinstance(state, dict) else type(state).__name__
        raise TunedError(f"{path / PARAMS_FILE} must hold {{i}}.weight/{{i}}.bias for i < {n} "
                         f"(config.json's num_hidden_layers), got {got}…; refit: {FIT_HINT}")
    for key, value in state.items():
        shape = (d, d) if key.endswith("weight") else (d,)
        if (not isinstance(value, Tensor) or tuple(value.shape) != shape
                or not value.is_floating_point()):
            raise TunedError(f"{path / PARAMS_FILE}: {key} must be a float tensor of shape "
                             f"{shape} (d_model {d}); refit: {FIT_HINT}")
        if not bool(torch.isfinite(value).all()):
            raise TunedError(f"{path / PARAMS_FILE}: {key} has non-finite values; "
                             f"refit: {FIT_HINT}")
    weight = torch.stack([state[f"{i}.weight"] for i in range(n)])
    bias = torch.stack([state[f"{i}.bias"] for i in range(n)]) if with_bias else None
    return TunedArtifacts(weight=weight, bias=bias, config=config, provenance=provenance)


def check_model(artifacts: TunedArtifacts, facts: ModelFacts, path: Path) -> str | None:
    """Refuse a set fitted on another model (``TunedError``); return a warning line or None.

    With our provenance every ``ModelFacts`` field is compared; a package-made
    set is compared on what its ``config.json`` records (``d_model``,
    ``num_hidden_layers``, ``unembed_hash`` when set, the name of
    ``base_model_name_or_path``); its shapes were checked against it at load.
    """
    if artifacts.provenance is not None:
        problem, warning = belongs(artifacts.provenance, facts)
    else:
        c = artifacts.config
        source = str(c.get("base_model_name_or_path") or "")
        recorded = {"model_id": source, "name": source.rstrip("/").rsplit("/", 1)[-1],
                    "d_model": c.get("d_model"), "n_layers": c.get("num_hidden_layers"),
                    "d_vocab": facts.d_vocab,  # the package does not record it
                    "unembed_hash": c.get("unembed_hash") or facts.unembed_hash}
        problems = mismatches(recorded, facts)
        problem = (f"they belong to another model: {', '.join(problems)} (artifacts vs model)"
                   if problems else None)
        warning = None if problem else id_warning(recorded, facts)
    if problem:
        raise TunedError(f"tuned-lens artifacts at {path}: {problem}; refit: {FIT_HINT}")
    return warning


class TunedLens(Lens):
    """``final_norm(h + h Aᵀ_ℓ + b_ℓ)`` for ℓ < n, ``final_norm(h)`` at ℓ = n, then the head."""

    name = "tuned"

    def __init__(self, unembed: Unembed, final_norm: NormSpec, artifacts: TunedArtifacts) -> None:
        super().__init__(unembed)
        self.final_norm = final_norm
        self.artifacts = artifacts
        self._params: dict[torch.device, tuple[Tensor, Tensor | None]] = {}

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """(Aᵀ stacked, b stacked) in the unembedding dtype on ``device``, made once."""
        if device not in self._params:
            a, dt = self.artifacts, self.unembed.dtype
            self._params[device] = (a.weight.transpose(1, 2).to(device=device, dtype=dt),
                                    None if a.bias is None else a.bias.to(device=device, dtype=dt))
        return self._params[device]

    def transform(self, resid: Tensor, layer: int) -> Tensor:
        """(seq, d_model) → (seq, d_model): the translated residual through the final norm."""
        if layer >= self.artifacts.n_layers:
            return self.final_norm(resid)
        A_T, b = self._on(resid.device)
        with torch.no_grad():
            h = resid.to(A_T.dtype)
            moved = h + h @ A_T[layer]
            return self.final_norm(moved if b is None else moved + b[layer])


KIND = FittedKind(
    mode_field="tuned", label="tuned-lens artifacts", error=TunedError, fit_hint=FIT_HINT,
    directory=artifact_dir, present=artifacts_present, load=load_artifacts, check=check_model,
    build=lambda artifacts, unembed, norms: TunedLens(unembed, norms[-1], artifacts),
    details=lambda artifacts: {
        "layers": artifacts.n_layers,
        "format": "lens" if artifacts.provenance is not None else "tuned-lens"},
    blank=("format", "layers"))
"""The tuned lens as a fitted lens (``lens.fitted``: ``--tuned auto|on|off``, as ``--prism``);
a set the tuned-lens package trained has no held-out verdict, so ``auto`` uses it."""


def resolve_tuned(config: RunConfig, *, name: str, model: LoadedModel, unembed: Unembed,
                  norms: Sequence[NormSpec]) -> Resolution:
    """Apply ``--tuned auto|on|off`` before any pass runs (``lens.fitted.resolve``)."""
    return fitted.resolve(KIND, config, name=name, model=model, unembed=unembed, norms=norms)


def precheck(config: RunConfig, name: str) -> None:
    """``--tuned on``: fail before the model loads when the set is unusable."""
    fitted.precheck(KIND, config, name)

