"""Drawing helpers for ``lens.plots``: fixed style, Agg figures, PNG bytes, cell labels as outlines.

Figures are ``matplotlib.figure.Figure`` objects on the Agg canvas (no
``pyplot``: no global backend or figure state), drawn under ``STYLE`` at
``DPI``, saved without ``Software`` metadata — the same input gives the same
bytes. matplotlib is imported inside the functions, so importing ``lens``
(and a ``--no-plots`` run) never imports it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from lens.gcpause import paused_gc

DPI = 100
STYLE = {
    "font.family": "DejaVu Sans", "font.size": 9, "axes.titlesize": 10,
    "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8,
    "figure.facecolor": "white", "axes.facecolor": "white", "savefig.facecolor": "white",
    "axes.grid": False, "text.usetex": False, "svg.hashsalt": "lens",
}
PNG_COMPRESS_LEVEL = 3
"""zlib level of the PNGs (heatmap 86 -> 43 ms to encode, 278 -> 285 kB; 6 is PIL's default)."""
SHARED_RENDERERS = 4
"""Figure sizes whose Agg renderer (width × height × 4 bytes) is kept for the next figure."""


def figure(width_px: int, height_px: int) -> Any:
    """A figure of exactly ``width_px`` × ``height_px`` pixels on an Agg canvas."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    _canvas_class()(fig)
    return fig


@functools.cache
def _canvas_class() -> type:
    """An Agg canvas that shares one renderer among figures of the same size.

    matplotlib caches text metrics and parsed mathtext per renderer, and a new
    figure gets a new renderer: every plot measured its tick labels and parsed
    the log axis' ``10^k`` labels again. The renderer is cleared before each
    draw, so sharing it changes no pixel; figures are drawn one at a time.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg

    renderers: dict[tuple[int, int, float], Any] = {}

    class SharedRendererCanvas(FigureCanvasAgg):
        def get_renderer(self) -> Any:
            width, height = self.get_width_height(physical=True)
            key = (width, height, self.figure.dpi)
            if key not in renderers:
                while len(renderers) >= SHARED_RENDERERS:
                    del renderers[next(iter(renderers))]
                renderers[key] = RendererAgg(width, height, self.figure.dpi)
            self.renderer = renderers[key]
            self._lastKey = key
            return self.renderer

    return SharedRendererCanvas


def png(fig: Any) -> bytes:
    """The figure as PNG bytes, without the ``Software`` chunk (it names the matplotlib version).

    zlib level ``PNG_COMPRESS_LEVEL``: the same pixels, files a few per cent larger than
    at the default 6, in about half the encoding time.
    """
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs for exotic token text
        fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None},
                    pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})
    return buffer.getvalue()


@contextlib.contextmanager
def drawing() -> Iterator[None]:
    """Draw under ``STYLE`` (the caller's rcParams untouched), the cyclic GC paused.

    A figure allocates tens of thousands of objects; in a process holding a
    model (hundreds of thousands of tracked objects) that triggers full
    collections, 0.3-0.6 s each, in the middle of a plot. Paused, the figure's
    garbage goes at the next young-generation collection (20-50 ms) instead.
    """
    import matplotlib

    with paused_gc(), matplotlib.rc_context(STYLE):
        yield


@functools.lru_cache(maxsize=4096)
def _label_outline(label: str) -> Any:
    """``label``'s glyph outline (text_to_path.FONT_SCALE units), centred like ha=va="center".

    Horizontally on its ink: the bounding box of the outline's points, which
    for DejaVu Sans (extreme points on the curve, as TrueType fonts are drawn)
    equals ``Path.get_extents`` — that walks every Bezier for its extrema and
    was most of a heatmap's time. Vertically on one line for all labels, the
    ink of "lp", so the labels share a baseline. Cached: a probe's heatmaps
    repeat most labels, and the style (``STYLE``) is fixed.
    """
    from matplotlib.font_manager import FontProperties
    from matplotlib.path import Path as MplPath
    from matplotlib.textpath import text_to_path
    from matplotlib.transforms import Affine2D

    prop = FontProperties()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs for exotic token text
        vertices, codes = text_to_path.get_text_path(prop, label)
    ink = _ink(vertices, codes)
    centre = (ink[0] + ink[1]) / 2 if ink else 0.0
    return MplPath(vertices, codes).transformed(Affine2D().translate(-centre, -_line_middle()))


@functools.cache
def _line_middle() -> float:
    """Half-way up the ink of "lp" (FONT_SCALE units): the one vertical centre of every label."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import text_to_path

    _, _, y0, y1 = _ink(*text_to_path.get_text_path(FontProperties(), "lp"))
    return (y0 + y1) / 2


def _ink(vertices: Any, codes: Any) -> tuple[float, float, float, float] | None:
    """(x0, x1, y0, y1) of an outline's points, leaving out CLOSEPOLY's placeholder vertex."""
    from matplotlib.path import Path as MplPath

    points = np.asarray(vertices, dtype=float).reshape(-1, 2)
    points = points[np.asarray(codes) != MplPath.CLOSEPOLY]
    if not len(points):
        return None
    (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
    return float(x0), float(x1), float(y0), float(y1)


def cell_labels(cells: Sequence[tuple[float, float, str, str]], *, fontsize: float,
                transform: Any) -> Any:
    """Cell labels ``(x, y, label, colour)`` (data coordinates) as ONE collection of outlines.

    A ``Text`` artist per cell (hundreds per heatmap) costs a layout and a glyph
    rendering each, most of a heatmap's time; one ``PathCollection`` draws them
    in one call. Each distinct label becomes a path once, without mathtext.
    ``transform`` places the cells (the axes' data transform).
    """
    from matplotlib.collections import PathCollection
    from matplotlib.textpath import text_to_path
    from matplotlib.transforms import Affine2D

    return PathCollection(
        [_label_outline(label) for _, _, label, _ in cells],
        offsets=[(x, y) for x, y, _, _ in cells], offset_transform=transform,
        transform=Affine2D().scale(fontsize / text_to_path.FONT_SCALE * DPI / 72),
        facecolors=[c for *_, c in cells], edgecolors="none", linewidths=0,
        snap=False)  # snapping would erase thin strokes ("-")


def minor_ticks_as_one_line(ax: Any) -> None:
    """Draw ``ax``'s y minor ticks as ONE line of tick markers instead of a ``Tick`` each.

    A log axis over several decades has eight unlabelled minor ticks per decade;
    matplotlib builds each as a ``Tick`` (three lines, two texts) to draw one
    marker. The same markers, at the minor locations inside the view (by
    matplotlib's own test), drawn by one ``Line2D`` give the same pixels for a
    fraction of the cost. An axis whose minor ticks carry labels is left as it
    is. Call it once the limits are final (after the data is plotted).
    """
    import matplotlib
    from matplotlib import lines, ticker, transforms

    axis = ax.yaxis
    low, high = sorted(axis.get_view_interval())
    scale = axis.get_transform()
    view = scale.transform([low, high])
    locs = axis.get_minorticklocs()
    if any(axis.get_minor_formatter().format_ticks(locs)):
        return  # under about two decades a log axis labels its minor ticks: leave them be
    shown = [loc for loc in locs if transforms._interval_contains_close(view, scale.transform(loc))]
    rc = matplotlib.rcParams
    marks = lines.Line2D(
        np.zeros(len(shown)), shown, linestyle="none", marker=lines.TICKLEFT,
        color=rc["ytick.color"], markeredgecolor=rc["ytick.color"],
        markersize=rc["ytick.minor.size"], markeredgewidth=rc["ytick.minor.width"],
        transform=ax.get_yaxis_transform("tick1"), zorder=axis.get_zorder(), clip_on=False)
    axis.set_minor_locator(ticker.NullLocator())
    ax.add_artist(marks)


def warm_up() -> None:
    """Import what drawing uses and find the font, so that the first figure does not wait.

    A plot worker (``lens.plotpool``) calls it at start, beside the model load.
    """
    import matplotlib
    from matplotlib import collections, lines, textpath, ticker  # noqa: F401
    from matplotlib.backends import backend_agg  # noqa: F401
    from matplotlib.figure import Figure  # noqa: F401
    from matplotlib.font_manager import FontProperties, findfont

    with matplotlib.rc_context(STYLE):
        findfont(FontProperties())
    _line_middle()
    _canvas_class()
