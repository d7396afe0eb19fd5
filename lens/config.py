"""Frozen run configuration. The probe types live in ``lens.probe`` and are re-exported here."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lens.errors import LensError
from lens.probe import Control, Fact, Probe, default_probe, parse_probe

__all__ = ["Control", "Fact", "Probe", "RunConfig", "default_probe", "parse_probe"]

RAW_LENS_MODES = ("off", "sample", "full")
PRISM_MODES = ("auto", "on", "off")
TUNED_MODES = PRISM_MODES
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
    tuned: str = "auto"
    """Tuned-lens sidecar: ``auto`` uses compatible artifacts, ``on`` requires them, ``off``."""
    tuned_dir: Path = Path("tuned")
    """Tuned-lens artifacts root: ``<tuned_dir>/<name>/`` (``lens.tuned``)."""
    keep_residuals: bool = False
    device_map: str | None = None
    """Passed to the bridge for models larger than one GPU: ``auto``, ``balanced``… or a JSON map."""
    n_devices: int | None = None
    """Split the model over this many CUDA devices (the bridge's ``n_devices``)."""
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
            (self.tuned, TUNED_MODES, "--tuned"),
            (self.device, DEVICES, "--device"),
            (self.dtype, DTYPES, "--dtype"),
        ):
            if value not in allowed:
                raise LensError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
        if self.n_devices is not None and self.n_devices < 1:
            raise LensError(f"--n-devices must be at least 1, got {self.n_devices}")
        if self.device_map is not None and not self.device_map.strip():
            raise LensError("--device-map needs a value: auto, balanced, sequential or a JSON map")
        if self.device_map is not None and self.n_devices is not None:
            raise LensError("--device-map and --n-devices both place the model; give only one")
        if self.multi_device and self.device != "auto":
            flag = "--device-map" if self.device_map is not None else "--n-devices"
            raise LensError(f"{flag} and --device {self.device} are mutually exclusive: "
                            f"{flag} places the model itself; drop --device")
        self.device_map_value()

    @property
    def multi_device(self) -> bool:
        """Whether the bridge, not lens, places the model (``--device-map``/``--n-devices`` > 1)."""
        return self.device_map is not None or (self.n_devices or 1) > 1

    def device_map_value(self) -> str | dict | None:
        """``--device-map`` as the bridge takes it: a strategy name or a decoded JSON map."""
        if self.device_map is None or not self.device_map.lstrip().startswith("{"):
            return self.device_map
        try:
            value = json.loads(self.device_map)
        except json.JSONDecodeError as exc:
            raise LensError(f"--device-map is not valid JSON: {exc.msg} at character {exc.pos}; "
                            'write it like {"model.embed_tokens": 0, "lm_head": 1}') from exc
        if not isinstance(value, dict):
            raise LensError("--device-map JSON must be an object mapping module names to devices")
        return value
