"""What one model's run came to: a summary row and, unless ok, a failure record.

Shared by the single-model run (``lens.runmodel``), the launchers that run
models elsewhere (``lens.launch``) and the sweep's summary (``lens.sweep``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lens.outputs import error_file
from lens.rundir import RunDir
from lens.writers import json_bytes

STATUSES = ("ok", "failed", "skipped", "interrupted", "not_run", "pending")
STAGES = ("resolve", "device", "load", "analyse", "write", "crash", "interrupted")


@dataclass(frozen=True, kw_only=True)
class ModelResult:
    """What one model's run came to; a summary row and, unless ok, a failure record."""

    model: str
    status: str
    """ok, failed, skipped (fits no device), interrupted, not_run, pending."""
    stage: str | None = None
    """Where it failed: resolve, device, load, analyse, write, crash, interrupted."""
    error_class: str | None = None
    message: str | None = None
    traceback: str | None = None
    """For failures that are bugs rather than bad input."""
    summary: Mapping[str, Any] = field(default_factory=dict)
    seconds: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "summary": dict(self.summary)}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ModelResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def error_record(self) -> dict[str, Any]:
        """The content of ``output-<name>.error.json``."""
        record = {"model": self.model, "stage": self.stage, "error_class": self.error_class,
                  "message": self.message}
        if self.traceback:
            record["traceback"] = self.traceback
        return record


def interrupted(model: str, message: str, error_class: str = "KeyboardInterrupt") -> ModelResult:
    """The result of a model stopped by Ctrl-C or SIGTERM."""
    return ModelResult(model=model, status="interrupted", stage="interrupted",
                       error_class=error_class, message=message)


def summary_fields(report: Mapping[str, Any]) -> dict[str, Any]:
    """The summary columns of one model, read from its ``output-<name>.json`` report."""
    diag = report["diagnostics"]
    n_layers = report["model_stats"]["num_layers"]
    l_sem = diag.get("L_semantic")
    consistency = diag.get("last_layer_consistency") or {}
    raw = (report.get("raw_lens_check") or {}).get("summary") or {}
    return {
        "n_layers": n_layers,
        "L_copy": diag.get("L_copy"),
        "L_copy_H": diag.get("L_copy_H"),
        "L_semantic": l_sem,
        "L_semantic_frac": None if l_sem is None or not n_layers else l_sem / n_layers,
        "first_kl_below_1.0": diag.get("first_kl_below_1.0"),
        "first_rank_le_1": diag.get("first_rank_le_1"),
        "last_layer_kl_bits": consistency.get("kl_to_final_bits"),
        "lens_artifact_risk": raw.get("lens_artifact_risk"),
        "delta_L_sem": (report.get("ablation_summary") or {}).get("delta_L_sem"),
        "max_control_margin": (report.get("control_summary") or {}).get("max_control_margin"),
    }


def write_error_record(out: RunDir, name: str, result: ModelResult) -> None:
    """Write ``output-<name>.error.json`` unless one exists already (never replaced)."""
    with contextlib.suppress(FileExistsError, OSError):
        out.create(error_file(name), json_bytes(result.error_record()))
