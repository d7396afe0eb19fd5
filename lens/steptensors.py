"""A layer step's tensors, each made when an emitter first reads it (``lens.emitters.LayerStep``).

Most emitters read only a step's plain values (``LayerStep.values``,
``LayerStep.last``), so a step's tensors are not made until asked for: a view
of the decoded chunk where the step's rows are consecutive in it, else a
gathered copy (facts whose prompts share a prefix share its decoded rows,
``lens.decode``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

DECODED = ("logits", "logp", "entropy", "top_p", "top_ids")
"""The tensors of a step that come from its decoded chunk, in ``StepTensors``' order."""


class StepTensors:
    """A step's tensors, each made when an emitter first reads it.

    ``decoded`` are the step's layer of its chunk (``DECODED``: every row of the
    chunk) and ``rows`` the step's rows among them: a slice, or a list where
    the pass's first positions are rows that another pass of the chunk
    decoded (facts that share a prompt prefix, ``lens.decode``). The step's
    tensor is then a view (a slice) or a gathered copy (a list); most emitters
    read only ``LayerStep.values`` and ``last``, so neither is made for them.
    ``resid`` is the pass's own residual rows at this layer, ``resid_rows`` of it.
    """

    __slots__ = ("_decoded", "_rows", "_resid", "_resid_rows", "_made")

    def __init__(self, decoded: Sequence[Tensor], rows: slice | Sequence[int], resid: Tensor,
                 resid_rows: slice = slice(None)) -> None:
        self._decoded = tuple(decoded)
        self._rows = _as_slice(rows)
        self._resid, self._resid_rows = resid, resid_rows
        self._made: dict[str, Tensor] = {}

    @classmethod
    def of(cls, *, resid: Tensor, logits: Tensor, logp: Tensor, entropy: Tensor,
           top_p: Tensor, top_ids: Tensor) -> StepTensors:
        """A step's tensors given whole (``(seq, …)`` each)."""
        return cls((logits, logp, entropy, top_p, top_ids), slice(None), resid)

    @property
    def n_rows(self) -> int:
        rows = self._rows
        return len(range(len(self._decoded[0]))[rows]) if isinstance(rows, slice) else len(rows)

    def get(self, name: str) -> Tensor:
        """The step's ``name`` tensor (``resid`` or one of ``DECODED``)."""
        if name not in self._made:
            if name == "resid":
                self._made[name] = self._resid[self._resid_rows]
            else:
                source, rows = self._decoded[DECODED.index(name)], self._rows
                if isinstance(rows, slice):
                    self._made[name] = source[rows]
                else:
                    index = torch.tensor(list(rows), device=source.device)
                    self._made[name] = source.index_select(0, index)
        return self._made[name]

    def row(self, name: str, row: int) -> Tensor:
        """One row of a decoded tensor: a view, never a gathered copy."""
        rows = self._rows
        index = range(len(self._decoded[0]))[rows][row] if isinstance(rows, slice) else rows[row]
        return self._decoded[DECODED.index(name)][index]

    def last_only(self) -> StepTensors:
        """The tensors of the last row alone (as a pass decoded at its last position has)."""
        rows = self._rows
        last = range(len(self._decoded[0]))[rows][-1] if isinstance(rows, slice) else rows[-1]
        resid_last = range(len(self._resid))[self._resid_rows][-1]
        return StepTensors(self._decoded, slice(last, last + 1), self._resid,
                           slice(resid_last, resid_last + 1))

    def copy(self) -> StepTensors:
        """Tensors of their own, made now: valid after the chunk's buffers are reused."""
        made = {name: self.get(name).clone() for name in ("resid", *DECODED)}
        return StepTensors.of(**made)


def _as_slice(rows: slice | Sequence[int]) -> slice | Sequence[int]:
    """A list of consecutive rows as the slice it is (its tensors are then views)."""
    if isinstance(rows, slice) or not rows:
        return rows
    first = rows[0]
    if list(rows) == list(range(first, first + len(rows))):
        return slice(first, first + len(rows))
    return rows
