"""The logit-lens heatmap: top-1 token per layer × position, coloured by entropy.

One per fact (``lens.plots`` names the files and schedules the drawing):
pos/orig, layers 0..n from the bottom, the last ``MAX_POSITIONS`` positions,
each cell's top-1 token written in black or white by the colour's lightness.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np

from lens.plotkit import cell_labels, drawing, figure, png
from lens.records import PositionRecord

CELL_W, CELL_H = 64, 22
"""Heatmap cell size in pixels."""
HEAT_MARGINS = {"left": 70, "right": 110, "top": 56, "bottom": 110}
MAX_POSITIONS = 48
"""The heatmap shows at most the last this-many positions."""
CELL_CHARS = 9
"""Characters of a token shown in a cell (longer text is cut with '…')."""


def display_token(text: str, limit: int = CELL_CHARS) -> str:
    """Token text as a cell label: control characters escaped, long text cut with '…'."""
    shown = (text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
             .replace("\t", "\\t"))
    shown = "".join(ch if ch.isprintable() or ch == " " else f"\\x{ord(ch):02x}" for ch in shown)
    return shown if len(shown) <= limit else shown[:limit - 1] + "…"


def heatmap_size(n_positions: int, n_layers: int) -> tuple[int, int]:
    """(width, height) in pixels of a heatmap of ``n_positions`` × (``n_layers`` + 1) cells."""
    cols = min(n_positions, MAX_POSITIONS)
    m = HEAT_MARGINS
    return (m["left"] + m["right"] + cols * CELL_W,
            m["top"] + m["bottom"] + (n_layers + 1) * CELL_H)


def plot_heatmap(records: Iterable[PositionRecord], *, n_layers: int, title: str) -> bytes:
    """The logit-lens heatmap of one pass: top-1 token per layer × position, colour = entropy.

    Args:
        records: The per-position records of one pass and one lens (every layer
            0..n_layers × every position).
        n_layers: Number of blocks; rows are layers 0..n_layers, layer 0 at the bottom.
        title: Figure title.
    """
    grid: dict[tuple[int, int], PositionRecord] = {(r.layer, r.pos): r for r in records}
    n_pos = 1 + max(pos for _, pos in grid)
    first = max(0, n_pos - MAX_POSITIONS)
    cols = list(range(first, n_pos))
    entropy = np.full((n_layers + 1, len(cols)), np.nan)
    for (layer, pos), r in grid.items():
        if pos >= first:
            entropy[layer, pos - first] = r.entropy
    vmax = max(1.0, float(np.nanmax(entropy))) if np.isfinite(entropy).any() else 1.0
    with drawing():
        frame = _heatmap_frame(n_layers, len(cols), entropy, vmax)
        ax, image = frame.ax, frame.image
        labelled = [(key, r) for key, r in sorted(grid.items()) if key[1] >= first and r.topk]
        rgba = image.get_cmap()(image.norm(np.array([r.entropy for _, r in labelled])))
        light = 0.299 * rgba[:, 0] + 0.587 * rgba[:, 1] + 0.114 * rgba[:, 2] > 0.5
        cells = [(pos - first, layer, display_token(r.topk[0][0]), "black" if lit else "white")
                 for ((layer, pos), r), lit in zip(labelled, light, strict=True)]
        ax.add_collection(cell_labels(cells, fontsize=7, transform=ax.transData), autolim=False)
        tokens = {r.pos: r.token for r in grid.values()}
        ax.set_xticks(range(len(cols)),
                      [display_token(tokens.get(p, ""), 14) for p in cols], rotation=60,
                      ha="right", rotation_mode="anchor")
        for label in ax.get_xticklabels():
            label.set_parse_math(False)
        shown = f", last {len(cols)} of {n_pos}" if first else ""
        ax.set_xlabel(f"input position (token){shown}")
        ax.set_title(title, parse_math=False, y=1.0)  # fixed y: no auto-placement pass
        return frame.png()


def prepare_heatmap(n_layers: int, n_positions: int) -> None:
    """Make and keep the frame of a heatmap of this shape now, while this process would
    be idle: a plot worker does it during the model load, once the prompts' lengths are
    known (``lens.plotpool``). The frame is drawn once, so that its layer labels' pixels
    are kept too; the heatmap drawn on it later is byte for byte a fresh one's."""
    cols = min(n_positions, MAX_POSITIONS)
    if (n_layers, cols) in _frames:
        return
    with drawing():
        _heatmap_frame(n_layers, cols, np.full((n_layers + 1, cols), np.nan), 1.0).png()


HEATMAP_FRAMES = 4
"""Heatmap shapes whose figure a process keeps for the next heatmap of that shape."""


class _Frame:
    """A kept heatmap figure: what depends only on the shape is made once (``_heatmap_frame``).

    Its layer labels (the y tick labels 0..n and "layer") are the same pixels in
    every heatmap of the shape and drawing them was a quarter of a heatmap: after
    the first PNG the frame keeps those pixels, hides the labels and pastes the
    pixels back after each draw (``_Pixels``), whenever nothing else the next
    heatmap draws (title, position labels) reaches them; else it draws them.
    """

    def __init__(self, fig: Any, ax: Any, image: Any) -> None:
        self.fig, self.ax, self.image = fig, ax, image
        self.labels: Any = None
        """The layer labels' pixels (``_Pixels``), once a PNG has drawn them."""

    def png(self) -> bytes:
        ax, labels = self.ax, self.labels
        pasted = labels is not None and not labels.overlaps(self._others())
        if labels is not None:
            labels.set_visible(pasted)
            ax.yaxis.set_tick_params(labelleft=not pasted)
            ax.yaxis.label.set_visible(not pasted)
        data = png(self.fig)
        if labels is None:
            self.labels = _Pixels.keep(self.fig, ax)
        return data

    def _others(self) -> list[Any]:
        """Window extents of what a heatmap draws outside its axes besides the layer labels."""
        renderer = self.fig.canvas.get_renderer()
        texts = [self.ax.title, *self.ax.get_xticklabels()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # missing glyphs for exotic token text
            return [t.get_window_extent(renderer) for t in texts
                    if t.get_visible() and t.get_text()]


class _Pixels:
    """A figure's pixels in a box, pasted back (``restore_region``) at the end of each draw."""

    def __init__(self, box: Any, pixels: Any) -> None:
        from matplotlib.artist import Artist

        self.box = box

        class Paste(Artist):
            def draw(self, renderer: Any) -> None:
                if self.get_visible():
                    renderer.restore_region(pixels)

        self.artist = Paste()
        self.artist.set_zorder(1e9)  # after everything the figure draws
        self.artist.set_visible(False)

    @classmethod
    def keep(cls, fig: Any, ax: Any) -> _Pixels | None:
        """The layer labels of ``ax`` as just drawn, or None if they reach the axes."""
        from matplotlib.transforms import Bbox

        renderer = fig.canvas.get_renderer()
        texts = [t for t in (*ax.get_yticklabels(), ax.yaxis.label)
                 if t.get_visible() and t.get_text()]
        box = Bbox.union([t.get_window_extent(renderer) for t in texts])
        box = Bbox.from_extents(np.floor(box.x0) - 1, np.floor(box.y0) - 1,  # and a pixel
                                np.ceil(box.x1) + 1, np.ceil(box.y1) + 1)
        ticks = ax.yaxis.get_major_ticks()[0].get_tick_padding()  # outside the axes, points
        if box.x1 >= ax.bbox.x0 - ticks * fig.dpi / 72:
            return None  # never paste over a tick mark or the axes
        kept = cls(box, fig.canvas.copy_from_bbox(box))
        fig.add_artist(kept.artist)
        return kept

    def set_visible(self, on: bool) -> None:
        self.artist.set_visible(on)

    def overlaps(self, extents: list[Any]) -> bool:
        return any(self.box.overlaps(e) for e in extents)


_frames: dict[tuple[int, int], _Frame] = {}


def _heatmap_frame(n_layers: int, n_cols: int, entropy: Any, vmax: float) -> _Frame:
    """The kept frame of a heatmap of this shape, showing ``entropy`` up to ``vmax``.

    What depends only on the shape (axes, layer ticks, colour bar) is made once
    and kept: a probe's heatmaps mostly share a shape, and making the tick
    artists was a quarter of each one's drawing. A kept frame gets the new
    image data and colour limits (its colour bar follows them) and loses the
    previous heatmap's cell labels; ``plot_heatmap`` sets everything else anew.
    The PNG is byte for byte that of a fresh figure (tests/test_plots.py).
    """
    key = (n_layers, n_cols)
    if key in _frames:
        frame = _frames[key]
        for collection in list(frame.ax.collections):
            collection.remove()  # the previous heatmap's cell labels
        frame.image.set_data(entropy)
        frame.image.set_clim(0.0, vmax)
        return frame
    width, height = heatmap_size(n_cols, n_layers)
    m = HEAT_MARGINS
    fig = figure(width, height)
    ax = fig.add_axes((m["left"] / width, m["bottom"] / height,
                       n_cols * CELL_W / width, (n_layers + 1) * CELL_H / height))
    image = ax.imshow(entropy, origin="lower", aspect="auto", cmap="viridis",
                      vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_yticks(range(n_layers + 1))
    ax.set_ylabel("layer")
    cax = fig.add_axes(((width - m["right"] + 16) / width, m["bottom"] / height,
                        14 / width, (n_layers + 1) * CELL_H / height))
    fig.colorbar(image, cax=cax, label="entropy (bits)")
    while len(_frames) >= HEATMAP_FRAMES:
        del _frames[next(iter(_frames))]
    _frames[key] = frame = _Frame(fig, ax, image)
    return frame
