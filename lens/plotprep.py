"""What a plot worker makes ready before its figures come, while the model loads.

A figure's first draw in a process costs more than the next one of its kind:
the figure, its axes and tick artists are made, and every label is measured
for the first time (text metrics are cached per renderer, ``lens.plotkit``).
A worker (``lens.plotpool``) starts with the run and would sit idle through
the model load, which leaves a core free; it spends that time on what the
run's figures will need, one step at a time, each only when no figure waits:

1. for the trajectories, at start: a stand-in figure drawn and dropped, so
   that the usual tick labels, panel titles and legend are measured already,
   then the frame of the real one (``lens.plots.prepare_trajectories``);
2. for the heatmaps, once the model's depth and the prompts' lengths are
   known (``Prepare``, sent as soon as the config and tokenizer are loaded,
   before the weights): the frame of each heatmap shape
   (``lens.heatmap.prepare_heatmap``).

None of it changes a byte: a prepared frame draws the PNG of a fresh figure
(tests/test_plotprep.py), and a guess that does not match the run (another
shape) only leaves a frame unused.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lens.heatmap import HEATMAP_FRAMES, MAX_POSITIONS, prepare_heatmap
from lens.plots import VARIANTS, Point, prepare_trajectories, trajectories_png

STAND_IN_LAYERS = 30
"""Depth of the stand-in trajectories figure (x tick labels 0, 5, ... 30)."""


def first_steps(kinds: Iterable[str]) -> list[Callable[[], None]]:
    """A worker's steps at start for its ``kinds`` of figure."""
    return [warm_trajectories] if "trajectories" in kinds else []


@dataclass(frozen=True)
class Prepare:
    """What a plot worker can make ready for one model once its config and tokenizer are
    loaded: the heatmap shapes ``(n_layers, n_positions)`` of its facts (``prepare_for``)."""

    heatmaps: tuple[tuple[int, int], ...]

    def steps(self, kinds: Iterable[str]) -> list[Callable[[], None]]:
        """A worker's steps for its ``kinds`` of figure: the heatmap frames."""
        heatmaps = self.heatmaps if "heatmap" in kinds else ()
        return [functools.partial(prepare_heatmap, *shape) for shape in heatmaps]


def prepare_for(n_layers: int, prompt_lengths: Iterable[int]) -> Prepare:
    """What to make ready for a model of ``n_layers`` blocks whose facts' prompts have these
    lengths in tokens: the first ``HEATMAP_FRAMES`` distinct heatmap shapes (the frames a
    process keeps)."""
    shapes = dict.fromkeys((n_layers, min(n, MAX_POSITIONS)) for n in prompt_lengths)
    return Prepare(heatmaps=tuple(shapes)[:HEATMAP_FRAMES])


def warm_trajectories() -> None:
    """Draw a stand-in trajectories figure and drop it, then make the real one's frame:
    its usual tick labels (layers, probabilities, ranks in powers of ten, bits), panel
    titles and legend are then measured already (a first figure's draw measured every
    one of them: 0.33-0.40 s against 0.26-0.33 s, SmolLM2's, in a fresh process)."""
    n = STAND_IN_LAYERS

    def values(layer: int) -> dict[str, float]:
        left = 1 - layer / n
        return {"p_answer": layer / n, "answer_rank": 10 ** (4 * left),
                "kl_to_final_bits": 10 * left, "entropy": 12 * left}

    trajectories_png([Point("", prompt_id, variant, "norm", layer, values(layer))
                      for prompt_id, variant, _, _ in VARIANTS for layer in range(n + 1)],
                     title="")
    prepare_trajectories()
