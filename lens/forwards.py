"""A run's forwards: each distinct prompt goes through the model once.

A probe's passes often repeat a prompt: the built-in ``capitals`` probe uses
each fact's prompt as another fact's control, so a third of its passes are
forwards already run. Same token ids, same forward (a causal model in eval
mode is a function of its ids), so ``Forwards`` runs each distinct id
sequence once and hands its ``Capture`` to every pass that asks for it.
Knowing the whole plan up front, it keeps a capture exactly until its last
pass has taken it: memory grows only with the prompts still to be reused.
"""

from __future__ import annotations

from collections.abc import Sequence

from lens.model import Capture, LoadedModel, capture, capture_batch

Key = tuple[int, ...]
WINDOW_ELEMENTS = 1 << 24
"""A many-fact probe decodes the passes of consecutive forward batches together
while their residuals stay within this many elements (64 MB in float32).

The captures of a window are held until its passes are decoded: a larger
window shares more of a template's prefix (``lens.rowgroups``) and fills more
last-position matmuls, for memory. On SmolLM2 (17,856 elements per token) a
window is 6 batches of ``capitals``' 8 passes: its 24 facts decode in 2
windows instead of 9 batches.
"""


def windows(lengths: Sequence[int], batch: int, per_token: int,
            budget: int | None = None) -> list[list[tuple[int, int]]]:
    """The plan's forward batches ``[start, stop)`` (``batch`` prompts each), grouped
    into consecutive windows whose prompts' residuals fit ``budget`` elements.

    Args:
        lengths: Every planned prompt's length in tokens.
        batch: Prompts per forward batch.
        per_token: Residual elements a token's capture holds (layers × d_model).
        budget: Elements a window's captures may hold (default ``WINDOW_ELEMENTS``); a
            batch alone may exceed it.
    """
    budget = WINDOW_ELEMENTS if budget is None else budget
    out: list[list[tuple[int, int]]] = []
    held = 0
    for start in range(0, len(lengths), max(1, batch)):
        stop = min(len(lengths), start + max(1, batch))
        size = sum(lengths[start:stop]) * per_token
        if out and held + size <= budget:
            out[-1].append((start, stop))
            held += size
        else:
            out.append([(start, stop)])
            held = size
    return out


class Forwards:
    """The captures of a planned sequence of prompts (token ids), each forwarded once.

    Args:
        model: The loaded model.
        plan: Every prompt's ids in the order ``take`` will ask for them.
        padded: Forward a call's new prompts as one right-padded batch
            (``capture_batch``: many-fact probes), the model's head at each
            prompt's last position only (the one a pass reads,
            ``lens.headpositions``); else one forward each (``capture``: the
            reference computation of a one-fact probe).
    """

    def __init__(self, model: LoadedModel, plan: Sequence[Sequence[int]], *,
                 padded: bool) -> None:
        self.model = model
        self.padded = padded
        self._last_use = {tuple(ids): i for i, ids in enumerate(plan)}
        self._kept: dict[Key, Capture] = {}
        self._taken = 0
        self.forwarded = 0
        """How many prompts went through the model (the distinct ones so far)."""

    def take(self, batch: Sequence[Sequence[int]]) -> list[Capture]:
        """The captures of the plan's next ``len(batch)`` prompts, ``batch``."""
        keys = [tuple(ids) for ids in batch]
        new = [k for k in dict.fromkeys(keys) if k not in self._kept]
        caps = (capture_batch(self.model, new, last_head=True) if self.padded
                else [capture(self.model, list(k)) for k in new])
        self._kept.update(zip(new, caps, strict=True))
        self.forwarded += len(new)
        out = [self._kept[k] for k in keys]
        self._taken += len(keys)
        for k in set(keys):
            if self._last_use.get(k, -1) < self._taken:
                del self._kept[k]
        return out
