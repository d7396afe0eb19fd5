"""Launchers: where the models of a sweep run (worker processes here, or Ray tasks).

A launcher runs models and reports through ``SweepEvents``; the sweep
(``lens.sweep``) owns the summary, the progress line and the exit status, so
every launcher gives the same files and the same guarantees.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lens.worker import ModelResult

LAUNCHERS = ("local", "ray")


@dataclass(frozen=True)
class SweepEvents:
    """What a launcher reports: a model started; a model ended (its files delivered)."""

    started: Callable[[str], None]
    finished: Callable[[str, ModelResult], None]
