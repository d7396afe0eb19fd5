"""Plots: valid PNGs of the expected size, for runs, awkward tokens and sweeps."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from lens import heatmap
from lens.config import RunConfig
from lens.heatmap import MAX_POSITIONS, display_token, heatmap_size, plot_heatmap
from lens.plots import (
    SWEEP_SIZE,
    TRAJECTORY_SIZE,
    SweepModel,
    plot_sweep,
    plot_trajectories,
    sweep_model_from_dir,
)
from lens.probe import default_probe, load_probe
from lens.records import PositionRecord
from lens.report import analyse
from lens.testing import TINY_MODELS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_PROBE = Path(__file__).resolve().parent / "probes" / "tiny-multi.yaml"


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the signature and the chunk CRC."""
    assert data[:8] == PNG_MAGIC
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16:16 + length]
    (crc,) = struct.unpack(">I", data[16 + length:20 + length])
    assert crc == zlib.crc32(kind + body)
    assert data.endswith(b"IEND\xaeB`\x82")
    width, height = struct.unpack(">II", body[:8])
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        assert image.size == (width, height)
    return width, height


@pytest.mark.parametrize("name", TINY_MODELS)
def test_cli_writes_heatmap_and_trajectories(run_lens, tiny_models, name):
    status, files, err = run_lens(f"tests/models/{name}", "--dtype", "float64")
    assert status == 0, err
    model = tiny_models[name]
    from lens.model import tokenize

    n_pos = len(tokenize(model, default_probe().facts[0].prompt))
    assert png_size(files[f"output-{name}-heatmap.png"]) == heatmap_size(n_pos, model.n_layers)
    assert png_size(files[f"output-{name}-trajectories.png"]) == TRAJECTORY_SIZE
    assert b"Software" not in files[f"output-{name}-heatmap.png"]


def test_no_plots_writes_no_png(run_lens):
    status, files, _ = run_lens("tests/models/tiny-gpt2", "--no-plots")
    assert status == 0 and files and not any(n.endswith(".png") for n in files)


def test_multi_fact_run_writes_a_heatmap_per_fact(run_lens):
    status, files, err = run_lens("tests/models/tiny-llama", "--probe", str(TINY_PROBE))
    assert status == 0, err
    ids = [f.id for f in load_probe(TINY_PROBE).facts]
    heatmaps = sorted(n for n in files if "-heatmap" in n)
    assert heatmaps == sorted(f"output-tiny-llama-heatmap-{i}.png" for i in ids)
    for n in heatmaps:
        png_size(files[n])
    assert png_size(files["output-tiny-llama-trajectories.png"]) == TRAJECTORY_SIZE


def _records(n_pos: int, n_layers: int, token: str = "tok") -> list[PositionRecord]:
    return [PositionRecord("norm", "pos", "orig", layer, pos, f"{token}{pos}",
                           float((layer + pos) % 7), ((f"{token}", 0.5), ("x", 0.2)), 0.3)
            for layer in range(n_layers + 1) for pos in range(n_pos)]


def test_heatmap_caps_long_prompts():
    data = plot_heatmap(_records(MAX_POSITIONS + 12, 3), n_layers=3, title="long")
    assert png_size(data) == heatmap_size(MAX_POSITIONS + 12, 3) == heatmap_size(MAX_POSITIONS, 3)


@pytest.mark.parametrize("token", ["$x^2$", "\r", "a,b\n", "été", "\\", "日本", "\x00", "  "])
def test_heatmap_survives_awkward_tokens(token):
    assert png_size(plot_heatmap(_records(3, 2, token), n_layers=2, title=f"t {token}")) == (
        heatmap_size(3, 2))


def test_heatmap_frame_reuse_draws_the_pixels_of_a_fresh_figure(monkeypatch):
    """A kept frame (axes, layer ticks, colour bar) redrawn with another heatmap of its
    shape gives that heatmap's fresh PNG: other tokens, labels and colour scale."""
    a = _records(5, 3, "alpha")
    b = [replace(r, entropy=r.entropy * 3.1 + 0.4, topk=(("β", 0.9),)) for r in _records(5, 3)]
    c = _records(5, 3, "gamma")[:-2]  # two cells missing: NaN in the image
    draw = {"a": lambda: plot_heatmap(a, n_layers=3, title="a"),
            "b": lambda: plot_heatmap(b, n_layers=3, title="b, a longer title"),
            "c": lambda: plot_heatmap(c, n_layers=3, title="c")}
    fresh = {}
    for name, fn in draw.items():
        monkeypatch.setattr(heatmap, "_frames", {})
        fresh[name] = fn()
    monkeypatch.setattr(heatmap, "_frames", {})
    pasted = []
    for name in ("a", "b", "a", "c", "b", "c"):
        assert draw[name]() == fresh[name], name
        (frame,) = heatmap._frames.values()  # one shape, one frame
        pasted.append(frame.labels.artist.get_visible())
    assert pasted == [False] + [True] * 5  # the layer labels' kept pixels, after the first
    assert len({*fresh.values()}) == 3
    # something else drawn where the layer labels are: they are drawn, not pasted
    monkeypatch.setattr(heatmap._Frame, "_others", lambda self: [self.labels.box])
    for name in ("b", "a"):
        assert draw[name]() == fresh[name], name
        assert not frame.labels.artist.get_visible()


def test_display_token():
    assert display_token(" Berlin") == " Berlin"
    assert display_token("a\nb\r") == "a\\nb\\r"
    assert display_token("x" * 20) == "x" * 8 + "…"
    assert display_token("\x00") == "\\x00"


def test_plots_are_deterministic(tiny_models):
    run = analyse(tiny_models["tiny-gpt2"], default_probe(), RunConfig(dtype="float64"))
    from lens.plots import plot_files

    assert plot_files(run) == plot_files(run)


def test_trajectories_include_the_raw_lens(tiny_models):
    run = analyse(tiny_models["tiny-llama"], default_probe(), RunConfig(dtype="float64"))
    lenses = {(r.lens, r.prompt_id, r.variant) for r in run.records
              if type(r).__name__ == "NextTokenRecord"}
    assert {("raw", "pos", "orig"), ("raw", "pos", "no_filler"), ("raw", "ctl", "orig")} <= lenses
    pure = [r for r in run.records if type(r).__name__ == "NextTokenRecord"]
    assert png_size(plot_trajectories(pure, title="t")) == TRAJECTORY_SIZE


def test_plot_sweep_from_records_and_from_written_outputs(run_lens, tiny_models, tmp_path):
    runs = {name: analyse(tiny_models[name], load_probe(TINY_PROBE), RunConfig(dtype="float64"))
            for name in TINY_MODELS}
    models = [SweepModel(name=n, n_layers=r.model.n_layers,
                         pure=[x for x in r.records if type(x).__name__ == "NextTokenRecord"])
              for n, r in runs.items()]
    target = tmp_path / "sweep.png"
    data = plot_sweep(models, target)
    assert png_size(data) == SWEEP_SIZE and target.read_bytes() == data

    out = tmp_path / "written"
    for name in TINY_MODELS:
        assert run_lens(f"tests/models/{name}", "--no-plots", out_dir=out)[0] == 0
    from_files = [sweep_model_from_dir(out, name) for name in TINY_MODELS]
    assert [m.n_layers for m in from_files] == [4, 4]
    assert png_size(plot_sweep(from_files)) == SWEEP_SIZE
