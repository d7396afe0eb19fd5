"""Launchers: where a sweep's models run: ``local`` (each in a fresh local process, one
after another) or ``ray`` (each a Ray task, concurrently).

A launcher runs models and reports through ``SweepEvents``; the sweep
(``lens.sweep``) owns the summary, the progress line and the exit status, so
every launcher gives the same files and the same guarantees.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lens.results import ModelResult

LAUNCHERS = ("local", "ray")


@dataclass(frozen=True)
class SweepEvents:
    """What a launcher reports: a model started; a model ended (its files delivered)."""

    started: Callable[[str], None]
    finished: Callable[[str, ModelResult], None]
