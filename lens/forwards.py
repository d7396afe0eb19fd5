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
