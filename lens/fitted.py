"""``--prism`` / ``--tuned`` ``auto|on|off``: one mechanism for every fitted lens.

A fitted lens (Prism, the tuned lens) decodes through artifacts fitted on one
model. Whether a run uses them is settled before any pass runs, the same way
for each: ``off`` looks at nothing beyond whether the files exist; ``auto``
uses a set that loads, belongs to the loaded model and beats the logit lens,
and otherwise records why not in ``diagnostics.<lens>_summary.error``; ``on``
raises one line where ``auto`` would record an error, except that it uses a
set that does not beat the logit lens, with a one-line warning. What differs
between the lenses (files, checks, the lens built) is a ``FittedKind``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lens.artifacts import ModelFacts, verdict_problem
from lens.errors import LensError
from lens.lenses.base import Lens, Resolution

log = logging.getLogger("lens")


@dataclass(frozen=True, eq=False)
class FittedKind:
    """What one fitted lens brings to ``resolve``: its files, its checks and its lens."""

    mode_field: str
    """The ``RunConfig`` field of its mode (``prism``), also its flag (``--prism``)."""
    label: str
    """How one line names its artifacts (``Prism artifacts``)."""
    error: type[LensError]
    fit_hint: str
    """How to fit a set (ends every refusal: ``refit: …``)."""
    directory: Callable[[Any, str], Path]
    """``(config, model name) -> <dir>/<name>/``."""
    present: Callable[[Path], bool]
    load: Callable[[Path], Any]
    """Reads and checks a set on its own (raises ``error``)."""
    check: Callable[[Any, ModelFacts, Path], str | None]
    """Refuses a set fitted on another model (raises ``error``); returns a warning or None."""
    build: Callable[[Any, Any, Sequence[Any]], Lens]
    """``(artifacts, unembed, norms) -> the lens``."""
    details: Callable[[Any], dict[str, Any]]
    """The summary fields of a set in use (``k``, ``layers``…)."""
    blank: tuple[str, ...]
    """Those fields' names (``None`` until a set is used)."""

    def on_error(self, exc: LensError) -> LensError:
        flag = "--" + self.mode_field.replace("_", "-")
        hint = "" if "refit" in str(exc) else f"; {self.fit_hint} or use {flag} auto"
        return LensError(f"{flag} on: {exc}{hint}")


def resolve(kind: FittedKind, config: Any, *, name: str, model: Any, unembed: Any,
            norms: Sequence[Any]) -> Resolution:
    """The lens to decode with (or None) and ``diagnostics.<lens>_summary`` (module doc)."""
    mode = getattr(config, kind.mode_field)
    path = kind.directory(config, name)
    summary: dict[str, Any] = {"mode": mode, "artifact_path": str(path),
                               "present": kind.present(path), "compatible": False,
                               **dict.fromkeys(kind.blank), "error": None, "warning": None}
    if mode == "off":
        return Resolution(None, summary)
    try:
        artifacts = kind.load(path)
        warning = kind.check(artifacts, ModelFacts.of(model), path)
        provenance = getattr(artifacts, "provenance", None)
        weak = None if provenance is None else verdict_problem(provenance)
        if weak and mode == "auto":
            raise kind.error(f"{kind.label} at {path}: {weak}; "
                             f"--{kind.mode_field} on uses them anyway")
        warning = "; ".join(w for w in (warning, weak) if w) or None
    except kind.error as exc:
        if mode == "on":
            raise kind.on_error(exc) from None
        summary["error"] = str(exc)
        return Resolution(None, summary)
    if warning:
        log.warning(f"lens: warning: {name}: {kind.label} at {path}: {warning}")
    summary.update(compatible=True, warning=warning, **kind.details(artifacts))
    return Resolution(kind.build(artifacts, unembed, norms), summary)


def precheck(kind: FittedKind, config: Any, name: str) -> None:
    """``on``: fail before a (possibly slow) model load when the set is unusable.

    Only what needs no model is checked here (files, readability, shapes,
    hashes); ``resolve`` checks whose the set is once the model is loaded.
    """
    if getattr(config, kind.mode_field) != "on":
        return
    try:
        kind.load(kind.directory(config, name))
    except kind.error as exc:
        raise kind.on_error(exc) from None
