"""Fitted-lens artifacts (Prism, tuned): whose they are, and writing a set all at once.

Both fitted lenses keep one folder of files per model, and two rules hold for both:

- **A set belongs to one model.** The fit records the model's facts
  (``ModelFacts``: model id and name, ``d_model``, layer count, ``d_vocab``, a
  hash of the unembedding) in the set's ``provenance.json``; ``mismatches``
  compares them with the loaded model, so artifacts copied from another model
  are refused with one line naming every difference. The name (the model id
  after its last ``/``) must match; a different full id with the same name
  (``./models/x`` vs ``/data/models/x``, or a hub id vs its local copy) is only
  a warning, since the shapes and the unembedding hash identify the weights.
- **A set is written whole.** ``write_set`` writes every file into a hidden
  staging folder beside the target and swaps it in with two renames, so an
  interrupted refit leaves the old set or the new one, never a mix; and the
  provenance records a sha256 per file, checked at load (``hash_mismatch``),
  so a set mixed by hand is refused too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from lens.errors import first_line

if TYPE_CHECKING:
    from lens.model import LoadedModel

PROVENANCE_FILE = "provenance.json"
FACT_KEYS = ("name", "d_model", "n_layers", "d_vocab", "unembed_hash")
"""The facts whose mismatch refuses a set (``model_id`` alone only warns)."""
_EDGE = 3
_THRESHOLD = 1000
"""numpy's default print options: arrays over 1000 elements print 3 edge items per axis."""


def unembedding_hash(W_U: Tensor) -> str:
    """The tuned-lens package's ``Unembed.unembedding_hash`` of a (d_model, d_vocab) ``W_U``.

    The package hashes numpy's printout, at one decimal, of the (d_vocab, d_model)
    float32 weight: a fingerprint that ignores the dtype the model was loaded in.
    For a matrix over 1000 elements numpy prints only the first and last three
    rows and columns (and sizes its columns from those), so the same printout
    comes from a 7 × 7 matrix of the corners with summarising forced: no copy of
    the whole unembedding is made, whatever its size.
    """
    import numpy as np

    W = W_U.detach().T  # (d_vocab, d_model), as nn.Linear.weight
    V, d = (int(s) for s in W.shape)
    options = dict(precision=1, edgeitems=_EDGE, linewidth=75, suppress=False, nanstr="nan",
                   infstr="inf", sign="-", floatmode="maxprec", legacy=False)
    if V * d <= _THRESHOLD:
        with np.printoptions(threshold=_THRESHOLD, **options):
            text = np.array_str(W.float().cpu().numpy(), precision=1)
    else:
        rows, cols = _edges(V), _edges(d)
        corners = W[rows][:, cols].float().cpu().numpy()
        with np.printoptions(threshold=0, **options):
            text = np.array_str(corners, precision=1)
    return hashlib.sha256(text.encode()).hexdigest()


def _edges(n: int) -> list[int]:
    """Indices numpy prints of an axis of length ``n``, plus one hidden one when it summarises."""
    if n <= 2 * _EDGE:
        return list(range(n))
    return [*range(_EDGE), _EDGE, *range(n - _EDGE, n)]


@dataclass(frozen=True)
class ModelFacts:
    """What an artifact set records about the model it was fitted on."""

    model_id: str
    name: str
    d_model: int
    n_layers: int
    d_vocab: int
    unembed_hash: str

    @classmethod
    def of(cls, model: LoadedModel) -> ModelFacts:
        return cls(model_id=model.model_id, name=model.name, d_model=model.d_model,
                   n_layers=model.n_layers, d_vocab=model.d_vocab,
                   unembed_hash=unembedding_hash(model.W_U))

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _show(key: str, value: Any) -> str:
    if key == "unembed_hash" and isinstance(value, str):
        return f"{value[:12]}…"
    return repr(value) if isinstance(value, str) else str(value)


def mismatches(recorded: Mapping[str, Any], facts: ModelFacts) -> list[str]:
    """``["d_vocab 100 vs 200", …]`` (artifacts vs model) for every fact that differs.

    A fact the provenance does not record counts as a mismatch (``d_vocab None
    vs 200``): a set that cannot say whose it is is not used.
    """
    actual = facts.as_json()
    return [f"{key} {_show(key, recorded.get(key))} vs {_show(key, actual[key])}"
            for key in FACT_KEYS if recorded.get(key) != actual[key]]


def id_warning(recorded: Mapping[str, Any], facts: ModelFacts) -> str | None:
    """A warning when the recorded model id differs from the loaded one (same name)."""
    recorded_id = recorded.get("model_id")
    if recorded_id == facts.model_id or _same_directory(recorded_id, facts.model_id):
        return None
    return (f"fitted on model id {recorded_id!r}, loaded as {facts.model_id!r} (same name, "
            "shapes and unembedding hash: used)")


def _same_directory(a: Any, b: str) -> bool:
    if not isinstance(a, str):
        return False
    with contextlib.suppress(OSError):
        pa, pb = Path(a).expanduser(), Path(b).expanduser()
        return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()
    return False


def file_hashes(files: Mapping[str, bytes]) -> dict[str, str]:
    """``{file name: sha256 hex}`` for the provenance's ``files`` key."""
    return {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}


def hash_mismatch(directory: Path, recorded: Any) -> str | None:
    """The first file of the set whose bytes differ from the provenance's sha256, or None.

    ``recorded`` is the provenance's ``files`` value; anything but a mapping of
    names to hashes is itself the problem.
    """
    if not isinstance(recorded, Mapping) or not recorded:
        return "provenance.json has no file hashes"
    for name, expected in recorded.items():
        try:
            data = (directory / str(name)).read_bytes()
        except OSError:
            return f"{name} is missing"
        if hashlib.sha256(data).hexdigest() != expected:
            return f"{name} does not match the sha256 in provenance.json (a mixed or edited set)"
    return None


def write_set(directory: Path, files: Mapping[str, bytes]) -> None:
    """Replace ``directory`` with exactly ``files``, all at once.

    The files go into ``.<name>.staging-<id>`` beside ``directory``, are
    fsynced, and the folder is renamed into place (the old set first moved to
    ``.<name>.old-<id>`` and deleted after). A crash leaves the old set, the
    new one, or (between the two renames) none, with the old set beside it:
    never files from two fits in one folder.
    """
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    staging = parent / f".{directory.name}.staging-{tag}"
    old = parent / f".{directory.name}.old-{tag}"
    staging.mkdir()
    moved = False
    try:
        for name, data in files.items():
            with open(staging / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if directory.exists():
            os.rename(directory, old)
            moved = True
        os.rename(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if moved and not directory.exists():
            os.rename(old, directory)
        raise
    if moved:
        shutil.rmtree(old, ignore_errors=True)


def read_provenance(path: Path) -> dict[str, Any]:
    """``provenance.json`` as a dict; raises ``ValueError`` with one line on anything else."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"invalid {path}: {first_line(exc)}") from None
    if not isinstance(value, dict):
        raise ValueError(f"invalid {path}: expected a JSON object")
    return value


def verdict(rows: list[dict[str, Any]], lens: str, *, baseline: str = "logit") -> dict[str, Any]:
    """Does ``lens`` earn its place? Its held-out KL against ``baseline``'s, depth by depth.

    ``rows`` is the fit's held-out table (``{"layer", lens, baseline, …}`` per
    depth). The lens beats the baseline unless its KL is higher at most depths;
    ``--<lens> auto`` does not use a set that does not (``verdict_problem``).
    """
    worse = [r["layer"] for r in rows if r[lens] > r[baseline]]
    beats = bool(rows) and 2 * len(worse) < len(rows)
    return {"beats_logit_lens": beats, "baseline": baseline, "layers_worse": worse,
            "reason": f"held-out KL above the {baseline} lens's at {len(worse)} of {len(rows)} "
                      "fitted depths"}


def verdict_problem(provenance: Mapping[str, Any]) -> str | None:
    """Why ``auto`` must not use a set (it does not beat the logit lens), or None."""
    v = provenance.get("verdict")
    if not isinstance(v, Mapping):
        return "provenance.json records no held-out verdict"
    if v.get("beats_logit_lens") is True:
        return None
    return f"it does not beat the logit lens ({v.get('reason', 'no reason recorded')})"


def belongs(provenance: Mapping[str, Any], facts: ModelFacts) -> tuple[str | None, str | None]:
    """(why the set is not this model's, a warning), each or None, from ``provenance["model"]``."""
    recorded = provenance.get("model")
    if not isinstance(recorded, Mapping):
        return "provenance.json records no model facts (fitted by an older lens)", None
    problems = mismatches(recorded, facts)
    if problems:
        return f"they belong to another model: {', '.join(problems)} (artifacts vs model)", None
    return None, id_warning(recorded, facts)
