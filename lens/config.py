"""Frozen run configuration. The probe types live in ``lens.probe`` and are re-exported here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lens.errors import LensError
from lens.probe import Control, Fact, Probe, default_probe, parse_probe

__all__ = ["Control", "Fact", "Probe", "RunConfig", "default_probe", "parse_probe"]

RAW_LENS_MODES = ("off", "sample", "full")
PRISM_MODES = ("auto", "on", "off")
DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = ("auto", "float32", "float64", "float16", "bfloat16")
SEED = 316


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything that changes the numbers of one model's run.

    Variants are made with ``dataclasses.replace``; validation raises
    ``LensError`` so bad CLI values become one clear line.
    """

    copy_threshold: float = 0.95
    copy_margin: float = 0.10
    copy_window_k: int = 1
    raw_lens: str = "sample"
    fp32_unembed: bool = False
    device: str = "auto"
    dtype: str = "auto"
    prism: str = "auto"
    prism_dir: Path | None = None
    keep_residuals: bool = False
    topk_verbose: int = 20
    topk_brief: int = 5
    batch_size: int = 8
    """Prompts per forward pass for probes with more than one fact (1 = one at a time)."""

    def __post_init__(self) -> None:
        if not 0 < self.copy_threshold <= 1:
            raise LensError(f"--copy-threshold must be in (0, 1], got {self.copy_threshold}")
        if not 0 <= self.copy_margin < 1:
            raise LensError(f"--copy-margin must be in [0, 1), got {self.copy_margin}")
        if self.copy_window_k < 1:
            raise LensError(f"--copy-window-k must be at least 1, got {self.copy_window_k}")
        if self.batch_size < 1:
            raise LensError(f"--batch-size must be at least 1, got {self.batch_size}")
        for value, allowed, flag in (
            (self.raw_lens, RAW_LENS_MODES, "--raw-lens"),
            (self.prism, PRISM_MODES, "--prism"),
            (self.device, DEVICES, "--device"),
            (self.dtype, DTYPES, "--dtype"),
        ):
            if value not in allowed:
                raise LensError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
