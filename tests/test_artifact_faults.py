"""Fitted-lens artifacts under fault (issue 13, defects 5-7), for Prism and the tuned lens alike.

5. A set fitted on another model is refused with one line naming the mismatch
   (``on``), or recorded in ``diagnostics.<lens>_summary.error`` (``auto``).
6. A set is written whole: an interrupted refit leaves the old set usable, and
   a set mixed by hand from two fits is refused.
7. A fit reports each failing model in one line and goes on to the next.

Every CLI case runs with and without ``--quiet``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lens import prism_fit, tuned_fit
from lens.artifacts import ModelFacts
from lens.prism import PrismArtifacts
from lens.prism import load_artifacts as load_prism
from lens.run import main as run_main
from lens.testing import REPO
from lens.tuned import TunedArtifacts
from lens.tuned import load_artifacts as load_tuned

MODEL = "tiny-llama"
QUIET = pytest.mark.parametrize("quiet", [True, False], ids=["quiet", "verbose"])
LENSES = pytest.mark.parametrize("lens", ["prism", "tuned"])
TEXT = " ".join(f"Fact {i}: the capital of land {i} is town {i * 5 % 11}." for i in range(80))


def _prism(facts: dict, *, seed: int = 0) -> PrismArtifacts:
    d = facts["d_model"]
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    return PrismArtifacts(mean=torch.zeros(d), var=torch.ones(d), eps=1e-8, Q=Q,
                          provenance={"k": d, "layers": [2], "model": facts,
                                      "verdict": {"beats_logit_lens": True, "reason": "test"}})


def _tuned(facts: dict, *, seed: int = 0) -> TunedArtifacts:
    n, d = facts["n_layers"], facts["d_model"]
    gen = torch.Generator().manual_seed(seed)
    base = TunedArtifacts.identity(ModelFacts(**facts))
    return TunedArtifacts(weight=torch.randn(n, d, d, generator=gen) * 0.01,
                          bias=torch.randn(n, d, generator=gen) * 0.01, config=base.config,
                          provenance={"model": facts, "verdict": {"beats_logit_lens": True}})


MAKERS = {"prism": _prism, "tuned": _tuned}
LOADERS = {"prism": load_prism, "tuned": load_tuned}


def _run(*args: str, quiet: bool, out: Path) -> tuple[int, str, dict[str, bytes]]:
    err = io.StringIO()
    argv = [f"tests/models/{MODEL}", "--dtype", "float64", "--device", "cpu", "--no-plots",
            "--out_dir", str(out), *args, *(["--quiet"] if quiet else [])]
    with contextlib.chdir(REPO), contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()):
        status = run_main(argv)
    files = {p.name: p.read_bytes() for p in out.iterdir()} if out.is_dir() else {}
    return status, err.getvalue(), files


# ------------------------------------------------------------------ 5. another model's set

OTHER = {
    "name": ({"name": "other-model"}, "name 'other-model' vs 'tiny-llama'"),
    "d_model": ({"d_model": 16}, "d_model 16 vs 32"),
    "layers": ({"n_layers": 6}, "n_layers 6 vs 4"),
    "d_vocab": ({"d_vocab": 999}, "d_vocab 999 vs"),
    "unembedding": ({"unembed_hash": "f" * 64}, "unembed_hash ffffffffffff… vs"),
}


@QUIET
@LENSES
@pytest.mark.parametrize("fact", sorted(OTHER))
def test_a_set_from_another_model_is_refused(fact, lens, quiet, tiny_models, tmp_path):
    changes, expected = OTHER[fact]
    facts = {**ModelFacts.of(tiny_models[MODEL]).as_json(), **changes}
    MAKERS[lens](facts).save(tmp_path / "art" / MODEL)
    flags = (f"--{lens}", "on", f"--{lens}-dir", str(tmp_path / "art"))
    status, err, files = _run(*flags, quiet=quiet, out=tmp_path / "on")
    lines = err.strip().splitlines()
    assert status == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"lens: error: --{lens} on: ") and expected in lines[0]
    assert not any(n.startswith("output-") and not n.endswith(".error.json") for n in files)

    status, err, files = _run(f"--{lens}-dir", str(tmp_path / "art"), quiet=quiet,
                              out=tmp_path / "auto")
    assert status == 0, err
    summary = json.loads(files[f"output-{MODEL}.json"])["diagnostics"][f"{lens}_summary"]
    assert not summary["compatible"] and expected in summary["error"]
    assert f"output-{MODEL}-records-{lens}.csv" not in files


# ------------------------------------------------------------------ 6. sets written whole


@LENSES
def test_an_interrupted_refit_leaves_the_old_set(lens, tiny_models, tmp_path, monkeypatch):
    facts = ModelFacts.of(tiny_models[MODEL]).as_json()
    target = tmp_path / MODEL
    MAKERS[lens](facts, seed=1).save(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    real_fsync, calls = os.fsync, []

    def failing_fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        MAKERS[lens](facts, seed=2).save(target)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == [MODEL]  # no staging folder left
    LOADERS[lens](target)


@QUIET
@LENSES
def test_a_set_mixed_from_two_fits_is_refused(lens, quiet, tiny_models, tmp_path):
    facts = ModelFacts.of(tiny_models[MODEL]).as_json()
    MAKERS[lens](facts, seed=1).save(tmp_path / "a" / MODEL)
    MAKERS[lens](facts, seed=2).save(tmp_path / "b" / MODEL)
    tensor_file = "Q_prism.pt" if lens == "prism" else "params.pt"
    shutil.copy(tmp_path / "b" / MODEL / tensor_file, tmp_path / "a" / MODEL / tensor_file)
    status, err, _ = _run(f"--{lens}", "on", f"--{lens}-dir", str(tmp_path / "a"), quiet=quiet,
                          out=tmp_path / "out")
    lines = err.strip().splitlines()
    assert status == 1 and len(lines) == 1, err
    assert f"{tensor_file} does not match the sha256 in provenance.json" in lines[0]


# ------------------------------------------------------------------ 7. one line per failed model


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory) -> Path:
    """tiny-llama with NaN in one row of block 1's MLP: every residual from layer 2 on is NaN.

    One row, not the whole matrix: a weight that is entirely NaN is refused at
    load time (``lens.validate``), before the fit's own non-finite check.
    """
    path = tmp_path_factory.mktemp("models") / "nan-llama"
    shutil.copytree(REPO / "tests" / "models" / MODEL, path)
    weights = load_file(path / "model.safetensors")
    key = next(k for k in weights if "layers.1." in k and "down_proj" in k)
    weights[key] = weights[key].clone()
    weights[key][0] = float("nan")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


FITS = {
    "prism": lambda models, d: prism_fit.main([*models, "--dtype", "float64", "--prism-dir", d]),
    "tuned": lambda models, d: tuned_fit.main([*models, "--dtype", "float64", "--tuned-dir", d,
                                               "--text-file", str(d) + ".txt", "--window", "16",
                                               "--windows", "20", "--steps", "2"]),
}


@LENSES
def test_a_fit_reports_each_failing_model_in_one_line_and_goes_on(lens, nan_model, tmp_path):
    out_dir = tmp_path / "fitted"
    Path(str(out_dir) + ".txt").write_text(TEXT, encoding="utf-8")
    err = io.StringIO()
    with contextlib.chdir(REPO), contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()):
        status = FITS[lens]([str(nan_model), "tests/models/tiny-gpt2"], str(out_dir))
    lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("lens: error")]
    assert status == 1 and "Traceback" not in err.getvalue(), err.getvalue()
    assert len(lines) == 1 and "nan-llama" in lines[0] and "non-finite" in lines[0], lines
    assert sorted(p.name for p in out_dir.iterdir()) == ["tiny-gpt2"]
    LOADERS[lens](out_dir / "tiny-gpt2")
