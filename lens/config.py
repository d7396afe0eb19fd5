"""Frozen run configuration and the probe (prompts as data, not code)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from lens.errors import LensError

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
    device_map: str | None = None
    """Passed to the bridge for models larger than one GPU: ``auto``, ``balanced``… or a JSON map."""
    n_devices: int | None = None
    """Split the model over this many CUDA devices (the bridge's ``n_devices``)."""
    topk_verbose: int = 20
    topk_brief: int = 5

    def __post_init__(self) -> None:
        if not 0 < self.copy_threshold <= 1:
            raise LensError(f"--copy-threshold must be in (0, 1], got {self.copy_threshold}")
        if not 0 <= self.copy_margin < 1:
            raise LensError(f"--copy-margin must be in [0, 1), got {self.copy_margin}")
        if self.copy_window_k < 1:
            raise LensError(f"--copy-window-k must be at least 1, got {self.copy_window_k}")
        for value, allowed, flag in (
            (self.raw_lens, RAW_LENS_MODES, "--raw-lens"),
            (self.prism, PRISM_MODES, "--prism"),
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


@dataclass(frozen=True, kw_only=True)
class Control:
    prompt: str
    answer: str


@dataclass(frozen=True, kw_only=True)
class Fact:
    """One fact of a probe: a prompt, its gold answer, an ablation and a control."""

    id: str
    prompt: str
    answer: str
    no_filler: str | None = None
    control: Control | None = None
    important_words: tuple[str, ...] = ()
    test_prompts: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Probe:
    name: str
    facts: tuple[Fact, ...] = field(default_factory=tuple)


def _fact(raw: dict, where: str) -> Fact:
    def text(key: str, obj: dict = raw, optional: bool = False) -> str | None:
        value = obj.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            raise LensError(f"{where}: field {key!r} must be a non-empty string")
        return value

    control = raw.get("control")
    if control is not None and not isinstance(control, dict):
        raise LensError(f"{where}: field 'control' must be an object with prompt and answer")
    return Fact(
        id=str(text("id")),
        prompt=str(text("prompt")),
        answer=str(text("answer")),
        no_filler=text("no_filler", optional=True),
        control=Control(prompt=str(text("prompt", control)), answer=str(text("answer", control)))
        if control
        else None,
        important_words=tuple(raw.get("important_words", ())),
        test_prompts=tuple(raw.get("test_prompts", ())),
    )


def parse_probe(raw: object, source: str) -> Probe:
    """Validate a decoded probe document; errors name the source and the fact."""
    if not isinstance(raw, dict) or not isinstance(raw.get("facts"), list) or not raw["facts"]:
        raise LensError(f"{source}: a probe needs a non-empty list 'facts'")
    facts = tuple(
        _fact(f if isinstance(f, dict) else {}, f"{source}: fact {i}")
        for i, f in enumerate(raw["facts"])
    )
    return Probe(name=str(raw.get("name", Path(source).stem)), facts=facts)


def default_probe() -> Probe:
    """The built-in baseline probe (SPEC §1), shipped as ``lens/probes/default.json``."""
    text = resources.files("lens").joinpath("probes/default.json").read_text(encoding="utf-8")
    return parse_probe(json.loads(text), "default.json")
