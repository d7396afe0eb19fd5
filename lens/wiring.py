"""How a Hugging Face decoder is wired, found by watching it run: the one owner of hooks.

There is no table of model families. A one-token forward with forward hooks on
every block and every norm module shows which norm reads the residual as it
enters a block (pre-norm: ``ln1``), which norm produces a block's output
(post-norm: the block's closing norm), which norm feeds the unembedding (the
final norm), and what the model does to the unembedding's output (its head
transform). A block that has neither shape (OLMo-2: norms after each sublayer,
none before) is decoded with the final norm at every layer.

The residual stream is captured with the same hooks: layer 0 is block 0's
input, layer ``i`` is what block ``i-1`` hands on — its output, or, in a
post-norm block, the sum its closing norm normalises (so that the norm lens at
the last layer is exactly the model's head; docs/outputs.md, Layers and lenses).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lens.errors import LensError

Architecture = Literal["pre_norm", "post_norm", "sublayer_norm"]


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    for value in (*args, kwargs.get("hidden_states"), *kwargs.values()):
        if isinstance(value, Tensor):
            return value
    raise LensError("a decoder block was called without a hidden-state tensor; "
                    "this model's blocks cannot be read by lens")


def _output_tensor(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else output[0]


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def find_blocks(model: nn.Module, n_layers: int) -> nn.ModuleList:
    """The decoder's list of blocks: the outermost ``ModuleList`` with ``n_layers`` entries."""
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers > 0:
            return module
    raise LensError(f"cannot find the {n_layers} decoder blocks of {type(model).__name__}; "
                    "lens reads causal LMs whose blocks sit in one ModuleList")


@dataclass(frozen=True, eq=False)
class Wiring:
    """Which module the model applies where, as observed on one forward pass."""

    architecture: Architecture
    blocks: tuple[nn.Module, ...]
    ln1: tuple[nn.Module | None, ...]
    """Per block: the first norm it calls (pre-norm: the one reading the incoming residual)."""
    closing: tuple[nn.Module | None, ...]
    """Per block: the norm whose output is the block's output (post-norm only)."""
    final_norm: nn.Module | None
    """The norm whose output the unembedding reads (None: the head reads the last block)."""
    head: nn.Module
    """The unembedding (``lm_head``)."""

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def norm_for_layer(self, layer: int) -> nn.Module:
        """The module the model itself applies next to the residual of ``layer``."""
        n = self.n_layers
        if not 0 <= layer <= n:
            raise ValueError(f"layer must be in [0, {n}], got {layer}")
        if self.architecture == "sublayer_norm":
            chosen = self.final_norm
        elif layer == 0:
            chosen = self.ln1[0]
        elif self.architecture == "post_norm":
            chosen = self.closing[layer - 1]
        else:
            chosen = self.ln1[layer] if layer < n else self.final_norm
        if chosen is None:
            raise LensError(f"no normalisation module found for layer {layer} of this "
                            f"{self.architecture} model; the norm lens cannot decode it")
        return chosen

    @contextlib.contextmanager
    def tap_residuals(self) -> Iterator[dict[int, Tensor]]:
        """Collect the residual of every layer (0..n) of the forwards run inside the block."""
        store: dict[int, Tensor] = {}

        def keep_input(layer: int):  # type: ignore[no-untyped-def]
            return lambda _m, args, kwargs: store.__setitem__(layer, _first_tensor(args, kwargs))

        def keep_output(layer: int):  # type: ignore[no-untyped-def]
            return lambda _m, _a, output: store.__setitem__(layer, _output_tensor(output))

        handles = [self.blocks[0].register_forward_pre_hook(keep_input(0), with_kwargs=True)]
        for i, block in enumerate(self.blocks):
            closing = self.closing[i] if self.architecture == "post_norm" else None
            handles.append(
                closing.register_forward_pre_hook(keep_input(i + 1), with_kwargs=True)
                if closing is not None else block.register_forward_hook(keep_output(i + 1)))
        try:
            yield store
        finally:
            for h in handles:
                h.remove()


@dataclass(frozen=True, eq=False)
class Observation:
    """What one forward showed: the wiring, and the head's input/output pair."""

    wiring: Wiring
    head_out: Tensor
    """(seq, d_vocab) the unembedding's own output."""
    logits: Tensor
    """(seq, d_vocab) the model's final logits (after its head transform, if any)."""


def observe(model: nn.Module, ids: Tensor, *, n_layers: int) -> Observation:
    """Run ``ids`` (1, seq) once with hooks everywhere and read the wiring off the calls."""
    blocks = tuple(find_blocks(model, n_layers))
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Module):
        raise LensError(f"{type(model).__name__} has no output embedding (lm_head); "
                        "lens needs a causal LM head")
    inside = {id(m) for b in blocks for m in b.modules()}
    outer_norms = [m for m in model.modules() if id(m) not in inside and _is_norm(m)]
    calls: list[tuple[nn.Module, Tensor, Tensor]] = []
    """(norm module, its input, its output) in the order the norms ran."""
    block_io: dict[int, tuple[Tensor, Tensor]] = {}
    io: dict[str, Tensor] = {}

    def on_norm(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        calls.append((m, _first_tensor(args, kwargs), _output_tensor(out)))

    def on_block(i: int):  # type: ignore[no-untyped-def]
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            block_io[i] = (_first_tensor(args, kwargs), _output_tensor(out))
        return hook

    handles = [head.register_forward_hook(
        lambda _m, args, out: io.update(head_in=args[0], head_out=out))]
    norms_of = [[m for m in b.children() if _is_norm(m)] for b in blocks]
    for i, b in enumerate(blocks):
        handles.append(b.register_forward_hook(on_block(i), with_kwargs=True))
    watched = {id(m): m for m in (*(m for ms in norms_of for m in ms), *outer_norms)}
    for m in watched.values():
        handles.append(m.register_forward_hook(on_norm, with_kwargs=True))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    if len(block_io) != n_layers or "head_in" not in io:
        raise LensError("the forward pass did not run every block and the head once; "
                        "lens cannot read this model's residual stream")
    ln1: list[nn.Module | None] = []
    closing: list[nn.Module | None] = []
    pre = post = True
    for i, norms in enumerate(norms_of):
        block_in, block_out = block_io[i]
        own = [c for c in calls if any(c[0] is m for m in norms)]
        ln1.append(own[0][0] if own else None)
        pre = pre and bool(own) and _same(own[0][1], block_in)
        closer = own[-1][0] if own and _same(own[-1][2], block_out) else None
        closing.append(closer)
        post = post and closer is not None
    final = next((m for m, _, out in calls
                  if any(m is o for o in outer_norms) and _same(out, io["head_in"])), None)
    architecture: Architecture
    if pre:
        architecture = "pre_norm"
    elif post:
        architecture = "post_norm"
    elif final is not None:
        architecture = "sublayer_norm"
    else:
        raise LensError("cannot tell how this model normalises its residual stream: no norm reads "
                        "a block's input, closes a block, or feeds the unembedding")
    if architecture == "pre_norm" and final is None:
        raise LensError("pre-norm model whose unembedding does not read a final norm's output "
                        "(e.g. a projection after it); the norm lens cannot decode it")
    wiring = Wiring(architecture=architecture, blocks=blocks, ln1=tuple(ln1),
                    closing=tuple(closing), final_norm=final, head=head)
    return Observation(wiring=wiring, head_out=io["head_out"][0].detach(),
                       logits=logits[0].detach())


def _same(a: Tensor, b: Tensor) -> bool:
    """The same values (NaN equal to NaN: a poisoned model is still wired the same way)."""
    return a is b or (a.shape == b.shape and a.dtype == b.dtype
                      and bool(torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)))
