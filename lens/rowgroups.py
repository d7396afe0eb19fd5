"""Which rows a decode computes: passes grouped to fit a chunk, a shared prefix decoded once.

``lens.decode.decode_many`` decodes its items (a pass's residual rows each) in
groups of consecutive items, each group's rows side by side in one chunk.
Facts written from one template share the prompt's first tokens: the
built-in ``capitals`` facts share 13 of their 17, so most of a many-fact
probe's rows are rows another fact already has. A causal model's residual at
a position depends only on the tokens up to it, so two prompts that start
with the same tokens have the same rows there; here an item's first
positions take the rows of an earlier item of its group whenever the tokens
up to them match AND the residuals are equal, bit for bit, at every layer
(padded batches of different widths could round differently: such rows are
decoded again). A row's decoded numbers depend only on that row (see
``decode_many``), so a shared row gives every pass the numbers its own row
would have given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lens.emitters import PassContext

Rows = slice | tuple[int, ...]
"""A member's rows in its group's chunk: consecutive (a slice) or not (shared ones first)."""


@dataclass(frozen=True)
class Group:
    """Items decoded side by side: one chunk row per distinct residual row."""

    members: tuple[int, ...]
    """The items, in order."""
    firsts: tuple[int, ...]
    """Per member: its first position with a row of its own (those before it are shared)."""
    rows: tuple[Rows, ...]
    """Per member: the chunk rows of its positions, in order."""
    width: int
    """Chunk rows per layer."""

    def resids(self, items: Sequence[tuple[PassContext, Tensor]]) -> Tensor:
        """(n_layers + 1, width, d_model): the rows the group decodes."""
        return torch.cat([items[i][1][:, first:]
                          for i, first in zip(self.members, self.firsts, strict=True)], dim=1)

    def last(self, member: int) -> int:
        """The chunk row of a member's last position."""
        rows = self.rows[member]
        return rows.stop - 1 if isinstance(rows, slice) else rows[-1]


class _Builder:
    """A group being filled: its rows so far, and a trie of the prompts whose every
    position it holds (``(row of the previous token, token) → row``)."""

    def __init__(self) -> None:
        self.members: list[int] = []
        self.firsts: list[int] = []
        self.rows: list[Rows] = []
        self.width = 0
        self._trie: dict[tuple[int, int], int] = {}
        self._sources: dict[int, tuple[Tensor, int]] = {}
        """Row → (the residuals it was taken from, position): what a sharer is compared with."""

    def shared(self, ctx: PassContext, resids: Tensor) -> list[int]:
        """The rows this group already has for the item's first positions."""
        if resids.shape[1] != len(ctx.input_ids):
            return []  # the last position alone: its tokens before it have no row here
        rows: list[int] = []  # the rows of the tokens' path in the trie: candidates
        parent = -1
        for token in ctx.input_ids:
            row = self._trie.get((parent, token))
            if row is None:
                break
            rows.append(row)
            parent = row
        start = 0  # checked in runs taken from one item's consecutive positions
        while start < len(rows):
            source, at = self._sources[rows[start]]
            end = self._run_end(rows, start)
            if not torch.equal(source[:, at:at + end - start], resids[:, start:end]):
                first = next(p for p in range(start, end)
                             if not torch.equal(source[:, at + p - start], resids[:, p]))
                return rows[:first]
            start = end
        return rows

    def _run_end(self, rows: list[int], start: int) -> int:
        """The end of the run of ``rows`` from ``start`` taken from one item's consecutive
        positions (one ``torch.equal`` checks them all)."""
        source, at = self._sources[rows[start]]
        end = start + 1
        while end < len(rows):
            other, position = self._sources[rows[end]]
            if other is not source or position != at + end - start:
                break
            end += 1
        return end

    def add(self, index: int, ctx: PassContext, resids: Tensor, shared: list[int]) -> None:
        n = resids.shape[1]
        first = len(shared)
        own = range(self.width, self.width + n - first)
        self.members.append(index)
        self.firsts.append(first)
        self.rows.append(slice(own.start, own.stop) if not shared else (*shared, *own))
        if n == len(ctx.input_ids):
            parent = shared[-1] if shared else -1
            for position, row in zip(range(first, n), own, strict=True):
                self._trie.setdefault((parent, ctx.input_ids[position]), row)
                self._sources[row] = (resids, position)
                parent = row
        self.width += n - first

    def build(self) -> Group:
        return Group(tuple(self.members), tuple(self.firsts), tuple(self.rows), self.width)


def group_rows(items: Sequence[tuple[PassContext, Tensor]], budget: int) -> list[Group]:
    """Consecutive items whose distinct rows together fit ``budget`` rows per layer (an
    item alone may exceed it), each item's shared prefix decoded once."""
    groups: list[Group] = []
    builder: _Builder | None = None
    for index, (ctx, resids) in enumerate(items):
        if builder is not None:
            shared = builder.shared(ctx, resids)
            if builder.width + resids.shape[1] - len(shared) <= budget:
                builder.add(index, ctx, resids, shared)
                continue
            groups.append(builder.build())
        builder = _Builder()
        builder.add(index, ctx, resids, [])
    if builder is not None:
        groups.append(builder.build())
    return groups
