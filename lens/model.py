"""Loading models and capturing residuals: plain Hugging Face, read with forward hooks.

A model comes from a local Hugging Face directory, a hub id, or the embedded
SmolLM2-135M-Instruct (``lens.embedded``). It runs as Hugging Face's own
``AutoModelForCausalLM`` (eager attention), so every number is the model's own;
``lens.wiring`` watches one forward to learn where its norms sit and captures
the residual stream with forward hooks. The same path serves pre-norm,
post-norm (OPT-350m style) and sublayer-norm (OLMo-2) blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from lens import validate
from lens.config import SEED
from lens.devices import (
    FreeMemory,
    estimate_params,
    free_memory,
    pick_device,
    pick_dtype,
    plan_device,
)
from lens.errors import LensError
from lens.gcpause import paused_gc
from lens.headpositions import head_rows, keeps_logits
from lens.norms import NormSpec, describe_norm
from lens.outputs import output_name
from lens.precision import model_precision
from lens.sources import quiet, resolve_source
from lens.unembed import HeadTransform, detect_head_transform
from lens.wiring import Architecture, Wiring, observe

__all__ = ["Capture", "LoadedModel", "capture", "estimate_params", "head_logits", "load_model",
           "output_name", "pick_device", "pick_dtype", "resolve_source", "tokenize"]

ROTARY_OR_ALIBI_KEYS = ("rope_parameters", "rope_theta", "rope_scaling", "rotary_pct",
                        "rotary_dim", "rotary_emb_base", "alibi", "position_embedding_base")


@dataclass(frozen=True, kw_only=True, eq=False)
class LoadedModel:
    """A booted model plus the facts about it that the analysis needs."""

    model_id: str
    name: str
    hf_model: Any
    """The Hugging Face ``...ForCausalLM`` (eval mode; never modified)."""
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
    wiring: Wiring
    norms: tuple[NormSpec, ...]
    """Per layer 0..n: the norm lens's maths (``norms[-1]`` is the final norm)."""
    head: HeadTransform
    """What the model's forward applies to the unembedding's output."""
    hf_config: Any
    prepend_bos: bool
    """Prepend the tokenizer's BOS when it does not add one itself (TransformerLens' convention)."""

    @property
    def W_U(self) -> Tensor:
        """(d_model, d_vocab) a transposed view of the head's weight (no copy)."""
        return cast(Tensor, self.wiring.head.weight).T

    @property
    def b_U(self) -> Tensor | None:
        bias = getattr(self.wiring.head, "bias", None)
        return bias if isinstance(bias, Tensor) else None

    def norm_module(self, layer: int) -> torch.nn.Module:
        """The model's own module behind ``norms[layer]`` (docs/outputs.md, Layers and lenses)."""
        return self.wiring.norm_for_layer(layer)


def _additive_positions(config: Any) -> bool:
    """Learned/absolute position embeddings (GPT-2, OPT) unless the config names rotary or ALiBi."""
    return not any(getattr(config, key, None) not in (None, False) for key in ROTARY_OR_ALIBI_KEYS)


def _placement(device_map: str | dict | None, n_devices: int | None) -> dict[str, Any]:
    """``from_pretrained`` kwargs that spread a model over several devices."""
    if device_map is not None:
        return {"device_map": device_map}
    count = int(n_devices or 1)
    return {"device_map": "balanced",
            "max_memory": {i: torch.cuda.get_device_properties(i).total_memory
                           for i in range(count)}}


@paused_gc()  # loading makes ~10^5 long-lived objects: no full collections meanwhile
def load_model(model_id: str, *, device: str = "auto", dtype: str = "auto",
               device_map: str | dict | None = None, n_devices: int | None = None,
               free: FreeMemory = free_memory,
               on_stage: Callable[[str], None] | None = None,
               on_config: Callable[[Any, Any], None] | None = None) -> LoadedModel:
    """Load ``model_id`` as a Hugging Face causal LM and learn its wiring.

    Args:
        device, dtype: ``--device``/``--dtype``; ``auto`` follows the dtype policy (README, Devices)
            (``lens.devices``), with the memory-fit check for ``--device auto``.
        device_map, n_devices: Spread a model larger than one GPU over several
            (Hugging Face/Accelerate placement; exclusive with an explicit ``device``).
        free: Free memory per device kind (injected by tests).
        on_stage: Called with ``resolve``, ``device`` and ``load`` as loading
            proceeds, so that a failure can say where it happened.
        on_config: Called with the Hugging Face config and the tokenizer as soon as
            they are loaded and checked, before the weights (a run's plot workers
            prepare their figures meanwhile, ``lens.plotpool``).
    """
    stage = on_stage or (lambda _: None)
    stage("resolve")
    source = resolve_source(model_id)
    stage("load")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with quiet():
            hf_config = AutoConfig.from_pretrained(source)
            tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - turned into one line for the user
        raise LensError(f"cannot load config/tokenizer of {model_id}: {validate.reason(exc)}") from exc
    validate.check_config(model_id, hf_config)
    if on_config is not None:
        on_config(hf_config, tokenizer)
    stage("device")
    multi = device_map is not None or (n_devices or 1) > 1
    plan = plan_device(device, model_id=model_id, n_params=estimate_params(hf_config), dtype=dtype,
                       multi_device=multi, n_devices=n_devices, free=free)
    dt = plan.dtype
    stage("load")
    try:
        with quiet(), model_precision(dt):
            hf_model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dt, attn_implementation="eager",
                **(_placement(device_map, n_devices) if multi else {}))
            if not multi:
                hf_model.to(plan.device)  # type: ignore[arg-type]  # transformers' stub
    except Exception as exc:  # noqa: BLE001
        raise LensError(f"cannot load weights of {model_id}: {validate.reason(exc)}") from exc
    validate.check_loaded(model_id, tokenizer, hf_model)
    hf_model.eval()
    dev = cast(Tensor, hf_model.get_input_embeddings().weight).device if multi else plan.device
    n_layers = int(hf_config.num_hidden_layers)
    probe = torch.tensor([[int(tokenizer.eos_token_id or 0)]], device=dev)
    with model_precision(dt):
        seen = observe(hf_model, probe, n_layers=n_layers)
    wiring = seen.wiring
    d_model = int(hf_config.hidden_size)
    norms = tuple(describe_norm(wiring.norm_for_layer(layer), d_model=d_model, dtype=dt, device=dev)
                  for layer in range(n_layers + 1))
    return LoadedModel(
        model_id=model_id,
        name=output_name(model_id),
        hf_model=hf_model,
        tokenizer=tokenizer,
        device=dev,
        dtype=dt,
        n_layers=n_layers,
        d_model=d_model,
        n_heads=int(hf_config.num_attention_heads),
        d_vocab=int(cast(Tensor, wiring.head.weight).shape[0]),
        n_ctx=int(getattr(hf_config, "max_position_embeddings", 0) or tokenizer.model_max_length),
        additive_positions=_additive_positions(hf_config),
        architecture=wiring.architecture,
        wiring=wiring,
        norms=norms,
        head=detect_head_transform(hf_config, seen.head_out, seen.logits),
        hf_config=hf_config,
        prepend_bos=True,
    )


@dataclass(frozen=True, eq=False)
class Capture:
    """One forward pass: the model's head and the residual stream at every layer."""

    head_logits: Tensor
    """(seq, d_vocab) the model's own output logits; (1, d_vocab), the last position's,
    from ``capture_batch(last_head=True)``."""
    resids: Tensor
    """(n_layers + 1, seq, d_model): layer 0 = block 0's input (embedding, + additive positions),
    i = what block i-1 hands on (``lens.wiring``)."""


def _forward(model: LoadedModel, tokens: Tensor, mask: Tensor | None = None,
             keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(logits (batch, seq, vocab), residuals (n_layers + 1, batch, seq, d_model)) of one forward.

    A row's position ids count only its real tokens (``cumsum(mask) - 1``), so
    a left-padded row gets the positions it would have alone. ``keep``: the
    model's head runs on these positions only (``logits_to_keep``; the
    logits are then (batch, len(keep), vocab)).
    """
    extra: dict[str, Tensor] = {}
    if mask is not None:
        extra = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp_min(0)}
    if keep is not None:
        extra["logits_to_keep"] = keep
    with torch.no_grad(), model_precision(model.dtype), model.wiring.tap_residuals() as taps:
        logits = model.hf_model(input_ids=tokens, **extra).logits
    dev = model.device  # a model split over devices (--device-map) is analysed on its first
    resids = torch.stack([taps[layer].to(dev) for layer in range(model.n_layers + 1)])
    return logits.detach().to(dev), resids.detach()


def capture(model: LoadedModel, ids: list[int]) -> Capture:
    """Run ``ids`` through the model once and capture the residual stream."""
    logits, resids = _forward(model, torch.tensor([ids], device=model.device))
    return Capture(head_logits=logits[0], resids=resids[:, 0])


PADDING_SIDES = ("left", "right")


def capture_batch(model: LoadedModel, batch: Sequence[Sequence[int]], *,
                  padding_side: str = "right", last_head: bool = False) -> list[Capture]:
    """Run several prompts in one padded forward; each capture is trimmed to its own tokens.

    Padding is masked with a 2-D attention mask. With left padding a row's real
    tokens no longer start at index 0, so their position ids must: they are
    derived from the mask (``cumsum(mask) - 1``, per row) — the learned
    positions of GPT-2 and the rotary angles of Llama alike. With right padding
    the real tokens keep positions ``0..len-1`` and, in a causal model, never
    attend to the padding after them. Either way a prompt's numbers equal
    its single-prompt numbers up to float rounding (matmul shapes differ).

    Args:
        model: The loaded model.
        batch: Token ids of each prompt (as ``tokenize`` gives them).
        padding_side: ``"right"`` (default) or ``"left"``.
        last_head: Run the model's head only where it is read, at each prompt's
            last position (``head_rows``); each capture's head logits are then
            (1, d_vocab).

    Returns:
        One ``Capture`` per prompt: head logits (len_i, d_vocab) and residuals
        (n_layers + 1, len_i, d_model), copied out of the batch tensors.
    """
    if not batch:
        return []
    tokens, mask, spans = _padded(model, batch, padding_side)
    keep = head_rows(spans, tokens.shape[1]) if last_head and keeps_logits(model.hf_model) else None
    logits, resids = _forward(model, tokens.to(model.device), mask.to(model.device),
                              None if keep is None else torch.tensor(keep, device=model.device))
    heads = [logits[row, span] if keep is None else logits[row, keep.index(span.stop - 1)][None]
             for row, span in enumerate(spans)]
    return [Capture(head_logits=head.clone(), resids=resids[:, row, span].clone())
            for row, (span, head) in enumerate(zip(spans, heads, strict=True))]


def _padded(model: LoadedModel, batch: Sequence[Sequence[int]],
            padding_side: str) -> tuple[Tensor, Tensor, list[slice]]:
    """Token ids and 2-D attention mask of ``batch`` padded to its longest prompt, row spans."""
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(ids) for ids in batch)
    # Padding is masked out, so any id the embedding has will do; a pad token added to
    # the tokenizer after training may lie past the embedding's rows.
    pad = next(int(t) for t in (model.tokenizer.pad_token_id, model.tokenizer.eos_token_id, 0)
               if t is not None and 0 <= int(t) < model.d_vocab)
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
            return model.hf_model(input_ids=tokens.to(model.device),
                                  attention_mask=mask.to(model.device), **extra).logits

    logits = forward(logits_to_keep=last) if keeps_logits(model.hf_model) else None
    if logits is None or tuple(logits.shape[:2]) != (len(batch), 1) or logits.ndim != 3:
        logits = forward()  # every position, then each row's last (a forward that slices otherwise)
        logits = torch.take_along_dim(logits, last[..., None].to(logits.device), dim=1)
    return logits[:, 0].detach().to(model.device)


def token_ids(tokenizer: Any, prompt: str, *, prepend_bos: bool = True) -> list[int]:
    """The tokenizer's ids of ``prompt``, BOS first as TransformerLens does (unchecked:
    ``tokenize`` checks them against the model)."""
    ids = list(tokenizer(prompt)["input_ids"])
    bos = tokenizer.bos_token_id
    if prepend_bos and bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, int(bos))
    return ids


def tokenize(model: LoadedModel, prompt: str) -> list[int]:
    """The model's normal tokenisation: the tokenizer's ids, BOS first as TransformerLens does."""
    if not prompt.strip():
        raise LensError("empty prompt: give the probe a prompt with text in it")
    ids = token_ids(model.tokenizer, prompt, prepend_bos=model.prepend_bos)
    bos = model.tokenizer.bos_token_id
    if not ids or (len(ids) == 1 and ids[0] == bos):
        raise LensError(f"prompt {prompt!r} tokenises to nothing; give a prompt with text in it")
    if max(ids) >= model.d_vocab:
        raise LensError(f"prompt {prompt!r} tokenises to id {max(ids)} but {model.name} has only "
                        f"{model.d_vocab} embedding rows: the tokenizer does not belong to these "
                        "weights; save the model's own tokenizer beside them")
    if len(ids) > model.n_ctx:
        raise LensError(f"prompt has {len(ids)} tokens but {model.name} takes at most "
                        f"{model.n_ctx}; shorten the prompt")
    return ids
