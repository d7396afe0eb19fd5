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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor

from lens.config import SEED
from lens.devices import FreeMemory, estimate_params, free_memory, pick_device, pick_dtype, plan_device
from lens.errors import LensError
from lens.norms import Architecture, NormSpec, classify_block_order, describe_norm, norm_for_layer
from lens.precision import model_precision

__all__ = ["Capture", "LoadedModel", "capture", "estimate_params", "head_logits", "load_model",
           "output_name", "pick_device", "pick_dtype", "resolve_source", "tokenize"]

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
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


def load_model(model_id: str, *, device: str = "auto", dtype: str = "auto",
               device_map: str | dict | None = None, n_devices: int | None = None,
               free: FreeMemory = free_memory,
               on_stage: Callable[[str], None] | None = None) -> LoadedModel:
    """Boot ``model_id`` through ``TransformerBridge`` in plain (HF-numerics) mode.

    Args:
        device, dtype: ``--device``/``--dtype``; ``auto`` follows the SPEC §9 policy
            (``lens.devices``), with the memory-fit check for ``--device auto``.
        device_map, n_devices: Passed to the bridge to place a model larger than
            one GPU (mutually exclusive with an explicit ``device``).
        free: Free memory per device kind (injected by tests).
        on_stage: Called with ``resolve``, ``device`` and ``load`` as loading
            proceeds, so that a failure can say where it happened.
    """
    stage = on_stage or (lambda _: None)
    stage("resolve")
    source = resolve_source(model_id)
    stage("load")
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoConfig, AutoTokenizer

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with _quiet():
            hf_config = AutoConfig.from_pretrained(source)
            tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - turned into one line for the user
        raise LensError(f"cannot load config/tokenizer of {model_id}: {_first_line(exc)}") from exc
    stage("device")
    multi = device_map is not None or (n_devices or 1) > 1
    plan = plan_device(device, model_id=model_id, n_params=estimate_params(hf_config), dtype=dtype,
                       multi_device=multi, n_devices=n_devices, free=free)
    dt = plan.dtype
    stage("load")
    placement: dict[str, Any] = (
        {"device_map": device_map, "n_devices": n_devices} if multi else {"device": str(plan.device)})
    try:
        with _quiet(), model_precision(dt):
            bridge = TransformerBridge.boot_transformers(source, dtype=dt, tokenizer=tokenizer,
                                                         **placement)
    except Exception as exc:  # noqa: BLE001
        raise LensError(f"cannot load weights of {model_id}: {_first_line(exc)}") from exc
    dev = torch.device(bridge.cfg.device or plan.device) if multi else plan.device
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
    dev = model.device  # a model split over devices (--device-map) is analysed on its first
    layer0 = cache["hook_embed"].to(dev)
    if model.additive_positions:
        layer0 = layer0 + cache["hook_pos_embed"].to(dev)
    resids = torch.stack(
        [layer0[0]] + [cache[f"blocks.{i}.hook_resid_post"][0].to(dev) for i in range(n)])
    return Capture(head_logits=logits[0].detach().to(dev), resids=resids.detach())


PADDING_SIDES = ("left", "right")


def capture_batch(model: LoadedModel, batch: Sequence[Sequence[int]], *,
                  padding_side: str = "right") -> list[Capture]:
    """Run several prompts in one padded forward; each capture is trimmed to its own tokens.

    Padding is masked with a 2-D attention mask. With left padding a row's real
    tokens no longer start at index 0, so their position ids must: the bridge
    derives them from the mask (``cumsum(mask) - 1``, per row, only for rows
    that need it) for every model whose forward accepts ``position_ids`` — the
    learned positions of GPT-2 and the rotary angles of Llama alike. With right
    padding the real tokens keep positions ``0..len-1`` and, in a causal model,
    never attend to the padding after them. Either way a prompt's numbers equal
    its single-prompt numbers up to float rounding (matmul shapes differ).

    Args:
        model: The loaded model.
        batch: Token ids of each prompt (as ``tokenize`` gives them).
        padding_side: ``"right"`` (default) or ``"left"``.

    Returns:
        One ``Capture`` per prompt: head logits (len_i, d_vocab) and residuals
        (n_layers + 1, len_i, d_model), copied out of the batch tensors.
    """
    if not batch:
        return []
    n = model.n_layers
    tokens, mask, spans = _padded(model, batch, padding_side)
    names = {"hook_embed", *(f"blocks.{i}.hook_resid_post" for i in range(n))}
    if model.additive_positions:
        names.add("hook_pos_embed")
    with torch.no_grad(), model_precision(model.dtype):
        logits, cache = model.bridge.run_with_cache(
            tokens.to(model.device), attention_mask=mask.to(model.device),
            names_filter=lambda h: h in names)
    layer0 = cache["hook_embed"]
    if model.additive_positions:
        layer0 = layer0 + cache["hook_pos_embed"]  # (batch or 1, width, d_model) broadcasts
    stacked = [layer0] + [cache[f"blocks.{i}.hook_resid_post"] for i in range(n)]
    return [
        Capture(head_logits=logits[row, span].detach().clone(),
                resids=torch.stack([t[row, span] for t in stacked]).detach().clone())
        for row, span in enumerate(spans)
    ]


def _padded(model: LoadedModel, batch: Sequence[Sequence[int]],
            padding_side: str) -> tuple[Tensor, Tensor, list[slice]]:
    """Token ids and 2-D attention mask of ``batch`` padded to its longest prompt, row spans."""
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(ids) for ids in batch)
    pad = model.tokenizer.pad_token_id
    pad = int(pad if pad is not None else (model.tokenizer.eos_token_id or 0))
    tokens = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    spans = []
    for row, ids in enumerate(batch):
        start = width - len(ids) if padding_side == "left" else 0
        tokens[row, start:start + len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        mask[row, start:start + len(ids)] = 1
        spans.append(slice(start, start + len(ids)))
    return tokens, mask, spans


def head_logits(model: LoadedModel, batch: Sequence[Sequence[int]]) -> Tensor:
    """(len(batch), d_vocab) the model's own logits at each prompt's last position.

    All prompts run in ONE right-padded forward (as ``capture_batch``: each
    prompt keeps positions ``0..len-1`` and never attends to the padding after
    it), so a row equals that prompt's single forward up to float rounding.
    Where the model's forward takes ``logits_to_keep``, it is asked for each
    row's last position only (a ``(batch, 1)`` tensor of positions): the other
    positions' unembeddings are never read, and with a wide vocabulary they
    cost as much as the blocks.
    """
    if not batch:
        return torch.empty((0, model.d_vocab), device=model.device)
    tokens, mask, spans = _padded(model, batch, "right")
    last = torch.tensor([[span.stop - 1] for span in spans], device=model.device)
    def forward(**extra: Any) -> Tensor:
        with torch.no_grad(), model_precision(model.dtype):
            return model.bridge(tokens.to(model.device), attention_mask=mask.to(model.device),
                                **extra)

    logits = forward(logits_to_keep=last) if _keeps_logits(model.bridge) else None
    if logits is None or tuple(logits.shape[:2]) != (len(batch), 1) or logits.ndim != 3:
        logits = forward()  # every position, then each row's last (a forward that slices otherwise)
        logits = torch.take_along_dim(logits, last[..., None].to(logits.device), dim=1)
    return logits[:, 0].detach().to(model.device)


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
