"""Frozen run configuration. The probe types live in ``lens.probe`` and are re-exported here."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from lens.errors import LensError
from lens.probe import Control, Fact, Probe, default_probe, parse_probe

__all__ = ["Control", "Fact", "Probe", "RunConfig", "default_probe", "option", "parse_probe"]

RawLensMode = Literal["off", "sample", "full"]
PrismMode = Literal["auto", "on", "off"]
TunedMode = Literal["auto", "on", "off"]
Device = Literal["auto", "cuda", "mps", "cpu"]
DType = Literal["auto", "float32", "float64", "float16", "bfloat16"]
RAW_LENS_MODES: tuple[str, ...] = get_args(RawLensMode)
PRISM_MODES: tuple[str, ...] = get_args(PrismMode)
TUNED_MODES: tuple[str, ...] = get_args(TunedMode)
DEVICES: tuple[str, ...] = get_args(Device)
DTYPES: tuple[str, ...] = get_args(DType)
SEED = 316
DEFAULT_LENSES = ("logit", "tuned", "prism")
"""Sidecar lenses by default; ``tuned`` and ``prism`` decode only where their artifacts fit."""


def cli_flag(field_name: str) -> str:
    """The command-line flag of a ``RunConfig`` field: ``copy_threshold`` → ``--copy-threshold``."""
    return "--" + field_name.replace("_", "-")


def choices(annotation: Any) -> tuple[str, ...]:
    """The allowed values of a ``Literal[...]`` annotation (``()`` for any other type)."""
    return tuple(get_args(annotation)) if get_origin(annotation) is Literal else ()


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def option(default: Any, help: str, *, metavar: str | None = None) -> Any:
    """A ``RunConfig`` field that is also a ``python -m lens.run`` flag (``lens.cli``).

    The flag is ``--`` plus the field name with ``-`` for ``_``; its type,
    default and choices come from the field itself (a ``Literal`` gives the
    choices), ``help`` says what it does (the default is appended).
    """
    return field(default=default, metadata={"help": help, "metavar": metavar})


def fixed(default: Any, why: str) -> Any:
    """A ``RunConfig`` field that is deliberately not a flag; ``why`` says why."""
    return field(default=default, metadata={"cli": False, "why": why})


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything that changes the numbers of one model's run.

    Each field is spelled once, here: ``lens.cli`` builds the command-line
    flags from the fields' types, defaults and ``option`` metadata. Variants
    are made with ``dataclasses.replace``; validation raises ``LensError`` so
    bad CLI values become one clear line.
    """

    copy_threshold: float = option(0.95, "copy rule: p_top1 above this", metavar="P")
    copy_margin: float = option(0.10, "copy rule: p_top1 - p_top2 above this", metavar="M")
    copy_window_k: int = option(1, "copy rule: top-1 ids in the copy window", metavar="K")
    raw_lens: RawLensMode = option(
        "sample", "raw-vs-norm lens check: off, sample (4 layers) or full (every layer)")
    fp32_unembed: bool = option(
        False, "decode through an fp32 copy of W_U even for fp32/fp16 compute")
    device: Device = option(
        "auto", "auto: first of cuda, mps, cpu whose free memory fits the model")
    dtype: DType = option(
        "auto",
        "compute dtype; auto follows the policy: cuda fp16 (Gemma bf16), mps fp16, cpu fp32")
    prism: PrismMode = option(
        "auto", "Prism sidecar lens: auto uses compatible artifacts, on requires them, "
                "off disables")
    prism_dir: Path | None = option(
        None, "Prism artifacts root: reads <dir>/<name>/ (default prisms/)", metavar="DIR")
    tuned: TunedMode = option(
        "auto", "tuned-lens sidecar: auto uses compatible artifacts, on requires them, "
                "off disables")
    tuned_dir: Path = option(
        Path("tuned"), "tuned-lens artifacts root: reads <dir>/<name>/", metavar="DIR")
    keep_residuals: bool = option(
        False, "also save the per-layer residuals as output-<name>-residuals.pt")
    device_map: str | None = option(
        None, "let Hugging Face place a model larger than one GPU: auto, balanced, sequential, "
              "or a JSON map of module names to devices", metavar="MAP")
    n_devices: int | None = option(None, "split the model over N CUDA devices", metavar="N")
    topk_verbose: int = fixed(20, "the records CSV layout has 20 top-k slots (docs/outputs.md)")
    topk_brief: int = fixed(5, "the top-5 of brief positions is part of the output contract")
    batch_size: int = option(
        8, "prompts per forward pass for probes with more than one fact (1 = one at a time)",
        metavar="N")
    lenses: tuple[str, ...] = option(
        DEFAULT_LENSES,
        "sidecar lenses beside the primary norm lens: logit, tuned, prism, raw; tuned/prism "
        "only where their artifacts fit", metavar="A,B,...")

    def __post_init__(self) -> None:
        if not 0 < self.copy_threshold <= 1:
            raise LensError(f"--copy-threshold must be in (0, 1], got {self.copy_threshold}")
        if not 0 <= self.copy_margin < 1:
            raise LensError(f"--copy-margin must be in [0, 1), got {self.copy_margin}")
        if self.copy_window_k < 1:
            raise LensError(f"--copy-window-k must be at least 1, got {self.copy_window_k}")
        if self.batch_size < 1:
            raise LensError(f"--batch-size must be at least 1, got {self.batch_size}")
        for f in fields(self):
            allowed = choices(self.field_type(f.name))
            if allowed and getattr(self, f.name) not in allowed:
                raise LensError(f"{cli_flag(f.name)} must be one of {', '.join(allowed)}, "
                                f"got {getattr(self, f.name)!r}")
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
        from lens.lenses.registry import check_lens_names  # the registry imports torch

        object.__setattr__(self, "lenses", tuple(self.lenses))  # a JSON list comes back a tuple
        check_lens_names(self.lenses)

    @classmethod
    def field_type(cls, name: str) -> Any:
        """The resolved annotation of field ``name`` (``Literal[...]``, ``Path | None``…)."""
        return _hints(cls)[name]

    def to_json(self) -> dict[str, Any]:
        """Every field as a JSON value (paths as strings); ``from_json`` gives this config back."""
        return {f.name: (str(v) if isinstance(v := getattr(self, f.name), Path) else v)
                for f in fields(self)}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> RunConfig:
        """The config ``to_json`` wrote (exact round trip); unknown keys are refused."""
        hints = _hints(cls)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise LensError(f"unknown run configuration keys {', '.join(unknown)}; "
                            "the configuration comes from another version of lens")
        values = {k: (Path(v) if v is not None and Path in get_args(hints[k]) + (hints[k],)
                      else v) for k, v in raw.items()}
        return cls(**values)

    @property
    def multi_device(self) -> bool:
        """Whether Hugging Face, not lens, places the model (``--device-map``/``--n-devices`` > 1)."""
        return self.device_map is not None or (self.n_devices or 1) > 1

    def device_map_value(self) -> str | dict | None:
        """``--device-map`` as ``from_pretrained`` takes it: a strategy name or a decoded JSON map."""
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
