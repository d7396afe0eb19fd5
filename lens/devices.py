"""Device and dtype policy (README, Devices): which device a model fits on, in which dtype.

``--device auto`` takes the first of cuda → mps → cpu whose free memory holds
the estimate ``params · bytes/param · (1 + OVERHEAD) + RESERVE[device]``, with
the dtype that device would get (cuda fp16, Gemma bf16; mps fp16; cpu fp32,
bf16 from 30B parameters). A model that fits nowhere is refused with
``DeviceError`` (the sweep records it as *skipped*). An explicit ``--device`` is
honoured without the fit check. Memory figures come from a ``FreeMemory``
function so that tests can inject them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lens.errors import LensError

GiB = 1 << 30
AUTO_ORDER = ("cuda", "mps", "cpu")
OVERHEAD = 0.20
"""Activations, caches, the fp32 unembedding shadow and allocator slack, as a share of the weights."""
RESERVE = {"cuda": 1 * GiB, "mps": 1 * GiB, "cpu": 2 * GiB}
"""Fixed headroom: the CUDA/MPS context, or the interpreter and libraries on the CPU."""
BIG_MODEL_PARAMS = 30e9
"""From this many parameters the CPU computes in bf16 instead of fp32."""
BYTES_PER_PARAM = {torch.float64: 8, torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}

CUDA_ENVIRONMENT = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8",
                    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
"""Deterministic cuBLAS (needed by ``torch.use_deterministic_algorithms``) and an allocator that
does not fragment across models of different sizes in one sweep; read when CUDA initialises."""


def prepare_cuda_environment() -> None:
    """Set ``CUDA_ENVIRONMENT`` where the user has not: call before CUDA initialises."""
    for key, value in CUDA_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


prepare_cuda_environment()  # at import: every path to CUDA (load_model, free_memory) imports this first

FreeMemory = Callable[[str], float | None]
"""``kind`` (cuda, mps, cpu) → free bytes; ``math.inf`` if present but unmeasurable; None if absent."""

_UNGATED_MLP = frozenset({"gpt2", "gpt_neo", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi",
                          "codegen", "gpt_bigcode", "mpt", "starcoder2"})


class DeviceError(LensError):
    """The model fits on no available device (the sweep marks it *skipped*)."""


@dataclass(frozen=True, kw_only=True)
class DevicePlan:
    """Where and in which dtype a model runs, and the memory figures behind the choice."""

    device: torch.device
    """The device lens computes on (for ``--device-map``: the one the dtype policy follows)."""
    dtype: torch.dtype
    n_params: int | None
    needed_bytes: float | None
    free_bytes: float | None


def free_memory(kind: str) -> float | None:
    """Free bytes on the first device of ``kind``; None when there is no such device."""
    if kind == "cuda":
        if not torch.cuda.is_available():
            return None
        try:
            return float(torch.cuda.mem_get_info(0)[0])
        except Exception:  # noqa: BLE001 - a device we cannot query still exists
            return math.inf
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if not (mps and mps.is_available()):
            return None
        try:
            return float(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
        except Exception:  # noqa: BLE001
            return math.inf
    if kind == "cpu":
        return _cpu_available()
    raise ValueError(f"unknown device kind {kind!r}")


def _cpu_available() -> float:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        try:
            return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf(pages))
        except (ValueError, OSError, AttributeError):
            continue
    return math.inf


def estimate_params(hf_config: Any) -> int | None:
    """Parameter count from a Hugging Face config, without loading weights.

    Counts the embeddings (twice unless tied; a GPT-2 style position table),
    and per layer the attention
    projections (grouped-query aware) and the MLP (gated: three matrices,
    GPT-2 style: two; times the experts of a mixture). Norms and biases are
    ignored (< 0.1 %). None when the config lacks the sizes.
    """
    cfg = getattr(hf_config, "text_config", None) or hf_config

    def get(*names: str) -> Any:
        return next((v for n in names if isinstance(v := getattr(cfg, n, None), int) and v > 0), None)

    d = get("hidden_size", "n_embd", "d_model")
    n = get("num_hidden_layers", "n_layer", "num_layers")
    v = get("vocab_size")
    if not (d and n and v):
        return None
    heads = get("num_attention_heads", "n_head") or 1
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or d // heads
    inter = get("intermediate_size", "n_inner", "ffn_dim") or 4 * d
    experts = get("num_local_experts", "num_experts", "n_routed_experts") or 1
    attn = 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim
    gated = str(getattr(cfg, "model_type", "")).lower() not in _UNGATED_MLP
    mlp = (3 if gated else 2) * d * inter * experts
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    learned_positions = (get("n_positions") or 0) * d  # GPT-2 style position table
    return int(n * (attn + mlp) + v * d * (1 if tied else 2) + learned_positions)


def pick_dtype(requested: str, device: torch.device, model_id: str, n_params: int | None) -> torch.dtype:
    """The dtype policy: cuda fp16 (Gemma bf16), mps fp16, cpu fp32 (≥ 30B: bf16)."""
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if "gemma" in model_id.lower() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if n_params is not None and n_params >= BIG_MODEL_PARAMS else torch.float32


def needed_bytes(n_params: int, dtype: torch.dtype, kind: str) -> float:
    """The memory estimate ``params · bytes/param · (1 + OVERHEAD) + RESERVE``."""
    return n_params * BYTES_PER_PARAM[dtype] * (1 + OVERHEAD) + RESERVE[kind]


def pick_device(requested: str, free: FreeMemory = free_memory) -> torch.device:
    """``auto``: the first of cuda → mps → cpu that exists; else the requested one if present."""
    if requested == "auto":
        return torch.device(next(k for k in AUTO_ORDER if k == "cpu" or free(k) is not None))
    if requested == "cuda" and free("cuda") is None:
        raise LensError("--device cuda asked for, but no CUDA device is available; use --device cpu")
    if requested == "mps" and free("mps") is None:
        raise LensError("--device mps asked for, but MPS is not available; use --device cpu")
    return torch.device(requested)


def _gib(n: float | None) -> str:
    return "unknown" if n is None or math.isinf(n) else f"{n / GiB:.1f} GiB"


def plan_device(requested: str, *, model_id: str, n_params: int | None, dtype: str = "auto",
                multi_device: bool = False, n_devices: int | None = None,
                free: FreeMemory = free_memory) -> DevicePlan:
    """Choose device and dtype for one model (README, Devices).

    Args:
        requested: ``auto``, ``cuda``, ``mps`` or ``cpu``.
        model_id: Decides the Gemma bf16 rule.
        n_params: The estimate from :func:`estimate_params`; None skips the fit check.
        dtype: ``auto`` for the policy, or a dtype name that overrides it.
        multi_device: ``--device-map``/``--n-devices``: Hugging Face places the
            weights; the dtype follows cuda when it exists, and there is no fit check.
        n_devices: ``--n-devices``; more than one needs CUDA.
        free: Free memory per device kind (injected by tests).

    Raises:
        DeviceError: ``auto`` and the model fits on no device.
        LensError: An explicitly requested device does not exist.
    """
    if multi_device:
        kind = "cuda" if free("cuda") is not None else "cpu"
        if (n_devices or 1) > 1 and kind != "cuda":
            raise LensError(f"--n-devices {n_devices} splits the model over CUDA devices, and "
                            "none is available; drop --n-devices")
        dev = torch.device(kind)
        return DevicePlan(device=dev, dtype=pick_dtype(dtype, dev, model_id, n_params),
                          n_params=n_params, needed_bytes=None, free_bytes=None)
    if requested != "auto" or n_params is None:
        dev = pick_device(requested, free)
        return DevicePlan(device=dev, dtype=pick_dtype(dtype, dev, model_id, n_params),
                          n_params=n_params, needed_bytes=None, free_bytes=free(dev.type))
    tried = []
    for kind in AUTO_ORDER:
        available = free(kind)
        if available is None:
            continue
        dev = torch.device(kind)
        dt = pick_dtype(dtype, dev, model_id, n_params)
        need = needed_bytes(n_params, dt, kind)
        if need <= available:
            return DevicePlan(device=dev, dtype=dt, n_params=n_params, needed_bytes=need,
                              free_bytes=available)
        tried.append(f"{kind} needs {_gib(need)} ({str(dt).removeprefix('torch.')}), "
                     f"has {_gib(available)} free")
    raise DeviceError(
        f"{model_id} (≈{n_params / 1e9:.3g}B parameters) fits on no device: {'; '.join(tried)}; "
        "skipped: split it over GPUs with --device-map auto or --n-devices N, "
        "or force a device with --device"
    )
