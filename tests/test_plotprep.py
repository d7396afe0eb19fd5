"""What plot workers prepare draws the bytes of fresh figures, and the run's hint names the
heatmap shapes it will draw."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import pytest

from lens import heatmap, plots
from lens.config import RunConfig
from lens.heatmap import MAX_POSITIONS, prepare_heatmap
from lens.model import load_model, token_ids, tokenize
from lens.plotprep import Prepare, first_steps, prepare_for, warm_trajectories
from lens.plots import plot_jobs, plot_trajectories, prepare_trajectories
from lens.probe import default_probe, load_probe
from lens.records import NextTokenRecord
from lens.report import analyse
from lens.runmodel import prompt_lengths
from lens.testing import REPO

TINY_PROBE = Path(__file__).resolve().parent / "probes" / "tiny-multi.yaml"


@pytest.fixture(scope="module")
def runs(tiny_models):  # type: ignore[no-untyped-def]
    """One fact with four lenses (bands off), and three facts (bands on)."""
    config = RunConfig(dtype="float64", lenses=("logit", "raw"))
    return {"one": analyse(tiny_models["tiny-llama"], default_probe(), config),
            "many": analyse(tiny_models["tiny-gpt2"], load_probe(TINY_PROBE), config)}


def _pure(run) -> list[NextTokenRecord]:  # type: ignore[no-untyped-def]
    return [r for r in run.records if isinstance(r, NextTokenRecord)]


@pytest.fixture
def nothing_kept(monkeypatch):  # type: ignore[no-untyped-def]
    """No frame prepared or kept from an earlier test."""
    monkeypatch.setattr(plots, "_prepared", [])
    monkeypatch.setattr(heatmap, "_frames", {})


def _trajectory_cases(runs) -> dict[str, list[NextTokenRecord]]:  # type: ignore[no-untyped-def]
    one, many = _pure(runs["one"]), _pure(runs["many"])
    return {
        "one fact, three lenses": one,
        "three facts, bands": many,
        # ranks within one decade: the log panel labels its minor ticks
        "ranks 1-3": [replace(r, answer_rank=1 + r.layer % 3) for r in one],
        # no p_answer anywhere: a panel without lines
        "no p_answer": [replace(r, p_answer=None) for r in many],
    }


def test_a_prepared_trajectories_frame_draws_the_bytes_of_a_fresh_figure(runs, nothing_kept):
    cases = _trajectory_cases(runs)
    fresh = {name: plot_trajectories(recs, title=name) for name, recs in cases.items()}
    assert len(set(fresh.values())) == len(cases)
    for name, recs in cases.items():
        prepare_trajectories()
        assert len(plots._prepared) == 1
        prepare_trajectories()  # one at most
        assert len(plots._prepared) == 1
        assert plot_trajectories(recs, title=name) == fresh[name], name
        assert not plots._prepared  # taken
    for name, recs in cases.items():  # after the stand-in figure, as a worker starts
        warm_trajectories()
        assert plot_trajectories(recs, title=name) == fresh[name], name


def test_a_prepared_heatmap_frame_draws_the_bytes_of_a_fresh_figure(runs, nothing_kept):
    jobs = [j for run in runs.values() for j in plot_jobs(run) if j.kind == "heatmap"]
    assert len(jobs) == 5  # one fact, and four
    fresh = []
    for job in jobs:
        heatmap._frames.clear()
        fresh.append(job.draw())
    for job, want in zip(jobs, fresh, strict=True):
        heatmap._frames.clear()
        prepare_heatmap(job.n_layers, 1 + max(r.pos for r in job.records))
        (frame,) = heatmap._frames.values()
        assert frame.labels is not None  # drawn once: the layer labels' pixels kept
        assert job.draw() == want
        assert list(heatmap._frames.values()) == [frame]  # the prepared frame was used


def test_the_hint_names_the_heatmap_shapes_a_run_draws(runs):
    """``prepare_for`` over ``prompt_lengths`` (what a run sends its workers before the
    weights load) gives exactly the shapes of the heatmaps the run then draws."""
    for run in runs.values():
        model, probe = run.model, run.probe
        drawn = {(j.n_layers, min(1 + max(r.pos for r in j.records), MAX_POSITIONS))
                 for j in plot_jobs(run) if j.kind == "heatmap"}
        hint = prepare_for(model.n_layers, prompt_lengths(model.tokenizer, probe))
        assert set(hint.heatmaps) == drawn
        assert len(hint.heatmaps) == len(drawn)


def test_prepare_for_keeps_the_first_distinct_shapes_up_to_the_frames_kept():
    hint = prepare_for(6, [5, 5, 300, 7, 48, 9, 11, 12])
    assert hint.heatmaps == ((6, 5), (6, MAX_POSITIONS), (6, 7), (6, 9))
    assert len(hint.heatmaps) == heatmap.HEATMAP_FRAMES


def test_a_worker_prepares_only_for_its_kinds_of_figure():
    hint = Prepare(heatmaps=((4, 5), (4, 6)))
    assert [s.args for s in hint.steps(["heatmap"])] == [(4, 5), (4, 6)]  # type: ignore[attr-defined]
    assert hint.steps(["trajectories"]) == []
    assert first_steps(["trajectories", "heatmap"]) == [warm_trajectories]
    assert first_steps(["heatmap"]) == []


def test_token_ids_are_the_ids_tokenize_checks(tiny_models):
    model = tiny_models["tiny-llama"]
    for prompt in ("The capital of France is", "a", " spaced  out "):
        assert token_ids(model.tokenizer, prompt) == tokenize(model, prompt)


def test_load_model_hands_config_and_tokenizer_over_before_the_weights(monkeypatch):
    """``on_config`` runs once, before ``from_pretrained`` loads the weights."""
    import transformers

    events: list[str] = []
    seen: list[tuple[int, object]] = []
    weights = transformers.AutoModelForCausalLM.from_pretrained

    def loading(*args, **kwargs):  # type: ignore[no-untyped-def]
        events.append("weights")
        return weights(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loading)

    def on_config(config, tokenizer):  # type: ignore[no-untyped-def]
        events.append("config")
        seen.append((config.num_hidden_layers, tokenizer))

    with contextlib.chdir(REPO):
        model = load_model("tests/models/tiny-llama", device="cpu", dtype="float64",
                           on_config=on_config)
    assert events == ["config", "weights"]
    assert seen == [(model.n_layers, model.tokenizer)]
