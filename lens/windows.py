"""Rolling windows of top-1 ids for copy detection, one per (lens, prompt, variant)."""

from __future__ import annotations

from collections import deque


class RollingWindow:
    """The last ``k`` top-1 token ids of one pass under one lens, oldest first.

    A pass creates a fresh window for each lens, so state never leaks from one
    prompt variant or lens into another.
    """

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"window size must be at least 1, got {k}")
        self.k = k
        self._ids: deque[int] = deque(maxlen=k)

    def push(self, token_id: int) -> tuple[int, ...]:
        """Append this layer's top-1 id and return the window's content."""
        self._ids.append(int(token_id))
        return tuple(self._ids)

    def __len__(self) -> int:
        return len(self._ids)
