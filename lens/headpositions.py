"""Where the model's own head runs in a padded forward: only the positions lens reads.

The head (``lm_head``) over every position of a batch costs a fifth of a
small model's forward, and a many-fact probe reads it at each prompt's last
position only. Hugging Face forwards take ``logits_to_keep``; these helpers
say whether one does and which positions to ask for.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any


def keeps_logits(hf_model: Any) -> bool:
    """Whether the model's forward takes ``logits_to_keep``."""
    forward = getattr(hf_model, "forward", None)
    try:
        return forward is not None and "logits_to_keep" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


HEAD_ROWS = 12
"""The fewest rows the model's head runs on when only some positions are read.

MKL's float32 matmul of SmolLM2's head (576 × 49 152) gave a row the same bits
in every matmul of 12 rows or more (2 threads; 4 on one thread), fewer rows
other bits. So the head of a padded batch runs on at least this many rows,
and a many-fact probe of SmolLM2 reads the bits of the head over every
position. Elsewhere (another BLAS, float64, tiny shapes) the two can differ
in the last bit, as any two matmul shapes can."""


def head_rows(spans: Sequence[slice], width: int) -> list[int]:
    """Positions of a padded batch the head runs on: each row's last, then more from the
    end until the batch holds ``HEAD_ROWS`` rows (every position if it has fewer)."""
    keep = sorted({span.stop - 1 for span in spans})
    extra = (p for p in range(width - 1, -1, -1) if p not in keep)
    while len(keep) * len(spans) < HEAD_ROWS and len(keep) < width:
        keep.append(next(extra))
    return sorted(keep)
