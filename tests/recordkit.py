"""Records compared to float64 rounding: passes decoded together (batched, a shared prefix,
a window of batches) against the same passes decoded alone."""

from __future__ import annotations

import math

from lens.records import Record, record_values


def close(a: object, b: object) -> bool:
    """Equal, or floats (also inside tuples) within 1e-12 relative; NaN equals NaN."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-12 * (1 + abs(b))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def records_close(got: Record, want: Record) -> bool:
    """Every field of ``want`` ``close`` to the same field of ``got``."""
    got_v, want_v = record_values(got), record_values(want)
    return all(close(got_v[k], want_v[k]) for k in want_v)
