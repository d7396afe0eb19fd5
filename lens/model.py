"""Loading models and capturing residuals. The only module that knows TransformerLens.

A model comes from a local Hugging Face directory, a hub id, or the embedded
SmolLM2-135M-Instruct (``lens.embedded``). The bridge runs in plain mode, not
compatibility mode, so its numbers are the model's own Hugging Face numbers.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor

from lens.config import SEED
from lens.errors import LensError
from lens.norms import Architecture, NormSpec, classify_block_order, describe_norm, norm_for_layer
from lens.precision import model_precision

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
ADDITIVE_POSITIONS = ("standard", "learned", "absolute")


@dataclass(frozen=True, kw_only=True, eq=False)
class LoadedModel:
    """A booted model plus the facts about it that the analysis needs."""

    model_id: str
    name: str
    bridge: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    n_layers: int
    d_model: int
    n_heads: int
    d_vocab: int
    n_ctx: int
    additive_positions: bool
    architecture: Architecture
    norms: tuple[NormSpec, ...]
    hf_config: Any
    prepend_bos: bool
    """Prepend the tokenizer's BOS when it does not add one itself (TransformerLens' default)."""

    @property
    def W_U(self) -> Tensor:
        return self.bridge.W_U

    @property
    def b_U(self) -> Tensor | None:
        return getattr(self.bridge, "b_U", None)


def output_name(model_id: str) -> str:
    """``<name>`` of the output files: the id after its last ``/``."""
    return model_id.rstrip("/").rsplit("/", 1)[-1]


def pick_device(requested: str) -> torch.device:
    """``auto``: the first of cuda → mps → cpu that exists."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise LensError("--device cuda asked for, but no CUDA device is available; use --device cpu")
    if requested == "mps" and not (torch.backends.mps.is_available()):
        raise LensError("--device mps asked for, but MPS is not available; use --device cpu")
    return torch.device(requested)


def pick_dtype(requested: str, device: torch.device, model_id: str, n_params: int | None) -> torch.dtype:
    """SPEC §9 dtype policy: cuda fp16 (Gemma bf16), mps fp16, cpu fp32 (≥ 30B bf16)."""
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if "gemma" in model_id.lower() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if n_params is not None and n_params >= 30e9 else torch.float32


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def resolve_source(model_id: str) -> str:
    """A local directory to load from, or a hub id known to be reachable or cached."""
    from lens import embedded

    if embedded.is_embedded(model_id):
        return str(embedded.embedded_model_dir())
    path = Path(model_id).expanduser()
    if path.exists() or model_id.startswith((".", "/", "~")) or os.sep + os.sep in model_id:
        if not path.is_dir():
            raise LensError(f"model directory {model_id} does not exist; pass a local Hugging Face "
                            "directory, a hub id, or nothing for the embedded model")
        if not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
            raise LensError(f"no weights in {path} (expected model.safetensors or pytorch_model.bin); "
                            "point at a complete Hugging Face model directory")
        if not any((path / f).exists() for f in TOKENIZER_FILES):
            raise LensError(f"no tokenizer in {path} (expected tokenizer.json, tokenizer.model or "
                            "vocab.json); save the tokenizer with tokenizer.save_pretrained(dir)")
        if not (path / "config.json").exists():
            raise LensError(f"no config.json in {path}; save the model with model.save_pretrained(dir)")
        return str(path)
    from transformers import AutoConfig

    try:
        with _quiet():
            AutoConfig.from_pretrained(model_id, local_files_only=True)
        return model_id
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise LensError(f"the Hugging Face hub is unreachable and {model_id!r} is not cached; "
                        "download it elsewhere and pass its local directory instead: "
                        "python -m lens.run /path/to/model")
    return model_id


@contextlib.contextmanager
def _quiet():
    """Silence library chatter (progress bars, warnings) during loading."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tl_logger = logging.getLogger("transformer_lens")
    tl_level = tl_logger.level
    tl_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()
        tl_logger.setLevel(tl_level)


def _block_order(bridge: Any, probe_id: int) -> Architecture:
    """Record the order in which block 0's norms and sublayers run on a one-token forward."""
    calls: list[str] = []
    block = bridge.blocks[0]
    handles = [
        getattr(block, name).register_forward_hook(lambda *_, n=name: calls.append(n))
        for name in ("ln1", "attn", "ln2", "mlp") if hasattr(block, name)
    ]
    try:
        with torch.no_grad(), model_precision(bridge.cfg.dtype):
            bridge(torch.tensor([[probe_id]], device=bridge.cfg.device))
    finally:
        for h in handles:
            h.remove()
    return classify_block_order(calls)


def load_model(model_id: str, *, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Boot ``model_id`` through ``TransformerBridge`` in plain (HF-numerics) mode."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoConfig, AutoTokenizer

    source = resolve_source(model_id)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True, warn_only=True)
    dev = pick_device(device)
    try:
        with _quiet():
            hf_config = AutoConfig.from_pretrained(source)
            tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - turned into one line for the user
        raise LensError(f"cannot load config/tokenizer of {model_id}: {_first_line(exc)}") from exc
    n_params = _estimate_params(hf_config)
    dt = pick_dtype(dtype, dev, model_id, n_params)
    try:
        with _quiet(), model_precision(dt):
            bridge = TransformerBridge.boot_transformers(source, device=str(dev), dtype=dt,
                                                         tokenizer=tokenizer)
    except Exception as exc:  # noqa: BLE001
        raise LensError(f"cannot load weights of {model_id}: {_first_line(exc)}") from exc
    bridge.eval()
    cfg = bridge.cfg
    n_layers = int(cfg.n_layers)
    architecture = _block_order(bridge, probe_id=int(tokenizer.eos_token_id or 0))
    blocks = bridge.blocks
    norms = tuple(
        describe_norm(norm_for_layer(
            layer, architecture=architecture, ln1=[b.ln1 for b in blocks],
            ln2=[b.ln2 for b in blocks], ln_final=bridge.ln_final,
        ), d_model=int(cfg.d_model), dtype=dt, device=dev)
        for layer in range(n_layers + 1)
    )
    return LoadedModel(
        model_id=model_id,
        name=output_name(model_id),
        bridge=bridge,
        tokenizer=tokenizer,
        device=dev,
        dtype=dt,
        n_layers=n_layers,
        d_model=int(cfg.d_model),
        n_heads=int(cfg.n_heads),
        d_vocab=int(bridge.W_U.shape[-1]),
        n_ctx=int(cfg.n_ctx),
        additive_positions=str(getattr(cfg, "positional_embedding_type", "")).lower()
        in ADDITIVE_POSITIONS,
        architecture=architecture,
        norms=norms,
        hf_config=hf_config,
        prepend_bos=bool(getattr(cfg, "default_prepend_bos", True)),
    )


def _estimate_params(hf_config: Any) -> int | None:
    d = getattr(hf_config, "hidden_size", None) or getattr(hf_config, "n_embd", None)
    n = getattr(hf_config, "num_hidden_layers", None) or getattr(hf_config, "n_layer", None)
    v = getattr(hf_config, "vocab_size", None)
    if not (d and n and v):
        return None
    return int(12 * n * d * d + 2 * v * d)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


@dataclass(frozen=True, eq=False)
class Capture:
    """One forward pass: the model's head and the residual stream at every layer."""

    head_logits: Tensor
    """(seq, d_vocab) the model's own output logits."""
    resids: Tensor
    """(n_layers + 1, seq, d_model): layer 0 = embedding (+ additive positions), i = resid_post of block i-1."""


def capture(model: LoadedModel, ids: list[int]) -> Capture:
    """Run ``ids`` through the model once and capture the residual stream."""
    n = model.n_layers
    names = {"hook_embed", *(f"blocks.{i}.hook_resid_post" for i in range(n))}
    if model.additive_positions:
        names.add("hook_pos_embed")
    tokens = torch.tensor([ids], device=model.device)
    with torch.no_grad(), model_precision(model.dtype):
        logits, cache = model.bridge.run_with_cache(tokens, names_filter=lambda h: h in names)
    layer0 = cache["hook_embed"]
    if model.additive_positions:
        layer0 = layer0 + cache["hook_pos_embed"]
    resids = torch.stack([layer0[0]] + [cache[f"blocks.{i}.hook_resid_post"][0] for i in range(n)])
    return Capture(head_logits=logits[0].detach(), resids=resids.detach())


def head_logits(model: LoadedModel, ids: list[int]) -> Tensor:
    """(d_vocab,) the model's own logits at the last position of ``ids``.

    Asks the model for the last position's logits only (``logits_to_keep=1``)
    where its forward takes that argument: the other positions' unembeddings
    are never read, and with a wide vocabulary they cost as much as the blocks.
    """
    extra = {"logits_to_keep": 1} if _keeps_logits(model.bridge) else {}
    with torch.no_grad(), model_precision(model.dtype):
        return model.bridge(torch.tensor([ids], device=model.device), **extra)[0, -1].detach()


def _keeps_logits(bridge: Any) -> bool:
    forward = getattr(getattr(bridge, "original_model", None), "forward", None)
    try:
        return forward is not None and "logits_to_keep" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def tokenize(model: LoadedModel, prompt: str) -> list[int]:
    """The model's normal tokenisation: the tokenizer's ids, BOS first as TransformerLens does."""
    if not prompt.strip():
        raise LensError("empty prompt: give the probe a prompt with text in it")
    ids = list(model.tokenizer(prompt)["input_ids"])
    bos = model.tokenizer.bos_token_id
    if model.prepend_bos and bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, int(bos))
    if not ids or (len(ids) == 1 and ids[0] == bos):
        raise LensError(f"prompt {prompt!r} tokenises to nothing; give a prompt with text in it")
    if len(ids) > model.n_ctx:
        raise LensError(f"prompt has {len(ids)} tokens but {model.name} takes at most "
                        f"{model.n_ctx}; shorten the prompt")
    return ids
