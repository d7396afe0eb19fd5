"""The tuned lens: maths, artifacts (ours and the tuned-lens package's), fit and sidecar."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lens import tuned_fit
from lens.artifacts import ModelFacts, unembedding_hash
from lens.config import RunConfig, default_probe
from lens.errors import LensError
from lens.lenses import LogitLens
from lens.model import capture, tokenize
from lens.testing import REPO, TINY_MODELS
from lens.tuned import (
    CONFIG_FILE,
    PARAMS_FILE,
    TunedArtifacts,
    TunedLens,
    load_artifacts,
    resolve_tuned,
)
from lens.unembed import Unembed
from lens.writers import read_csv_rows

F64 = torch.float64
PROMPT = default_probe().facts[0].prompt
TEXT = " ".join(f"The capital of country number {i} is city {i * 7 % 13}; Berlin, Paris, Rome."
                for i in range(120))
PACKAGE_CONFIG_KEYS = {"base_model_name_or_path", "d_model", "num_hidden_layers", "bias",
                       "base_model_revision", "unembed_hash", "lens_type"}
"""tuned-lens's ``TunedLensConfig`` fields (tuned_lens/nn/lenses.py)."""


def _random(model, seed: int = 0, scale: float = 0.05) -> TunedArtifacts:
    gen = torch.Generator().manual_seed(seed)
    n, d = model.n_layers, model.d_model
    base = TunedArtifacts.identity(ModelFacts.of(model))
    return TunedArtifacts(weight=torch.randn(n, d, d, generator=gen) * scale,
                          bias=torch.randn(n, d, generator=gen) * scale, config=base.config,
                          provenance={"model": ModelFacts.of(model).as_json(),
                                      "verdict": {"beats_logit_lens": True}})


def _resids(model):
    return capture(model, tokenize(model, PROMPT)).resids


# --------------------------------------------------------------------------- the maths


@pytest.mark.parametrize("name", TINY_MODELS)
def test_identity_translators_reproduce_the_logit_lens_exactly(tiny_models, name):
    model = tiny_models[name]
    unembed = Unembed(model.W_U, model.b_U, dtype=model.dtype)
    tuned = TunedLens(unembed, model.norms[-1], TunedArtifacts.identity(ModelFacts.of(model)))
    logit = LogitLens(unembed, model.norms[-1])
    resids = _resids(model)
    layers = list(range(model.n_layers + 1))
    for layer in layers:
        assert torch.equal(tuned.forward(resids[layer], layer), logit.forward(resids[layer], layer))
    assert torch.equal(tuned.decode(resids, layers), logit.decode(resids, layers))


@pytest.mark.parametrize("name", TINY_MODELS)
def test_translator_is_added_residually_then_the_final_norm_and_head(tiny_models, name):
    model = tiny_models[name]
    art = _random(model)
    lens = TunedLens(Unembed(model.W_U, model.b_U, dtype=F64), model.norms[-1], art)
    resids = _resids(model)
    for layer in range(model.n_layers):
        h = resids[layer]
        moved = h + h @ art.weight[layer].double().T + art.bias[layer].double()
        expected = model.norms[-1](moved) @ model.W_U
        expected = expected if model.b_U is None else expected + model.b_U
        torch.testing.assert_close(lens.forward(h, layer), expected)
    last = model.n_layers  # no translator: the model's own head
    head = capture(model, tokenize(model, PROMPT)).head_logits
    torch.testing.assert_close(lens.forward(resids[last], last), head)


# --------------------------------------------------------------------------- artifacts


def test_save_load_round_trip_is_exact(tiny_models, tmp_path):
    model = tiny_models["tiny-llama"]
    art = _random(model)
    art.save(tmp_path / "tiny-llama")
    back = load_artifacts(tmp_path / "tiny-llama")
    assert torch.equal(back.weight, art.weight) and torch.equal(back.bias, art.bias)
    assert back.config == art.config and back.provenance["model"] == art.provenance["model"]
    assert set(back.provenance["files"]) == {CONFIG_FILE, PARAMS_FILE}


def test_our_artifacts_are_in_the_tuned_lens_package_layout(tiny_models, tmp_path):
    model = tiny_models["tiny-gpt2"]
    art = _random(model)
    art.save(tmp_path / "x")
    config = json.loads((tmp_path / "x" / CONFIG_FILE).read_text())
    assert set(config) == PACKAGE_CONFIG_KEYS and config["lens_type"] == "linear_tuned_lens"
    assert config["num_hidden_layers"] == model.n_layers and config["d_model"] == model.d_model
    assert config["unembed_hash"] == unembedding_hash(model.W_U)
    # what the package's TunedLens.from_unembed_and_pretrained does with params.pt
    translators = nn.ModuleList(nn.Linear(model.d_model, model.d_model)
                                for _ in range(config["num_hidden_layers"]))
    translators.load_state_dict(torch.load(tmp_path / "x" / PARAMS_FILE, weights_only=True))
    h = _resids(model)[1].float()
    torch.testing.assert_close(h + translators[1](h), h + h @ art.weight[1].T + art.bias[1])


def _package_lens(model, directory: Path, *, bias: bool = True, **config_changes) -> nn.ModuleList:
    """Write a lens the way tuned-lens's ``TunedLens.save`` does; return its translators."""
    d, n = model.d_model, model.n_layers
    torch.manual_seed(3)
    translators = nn.ModuleList(nn.Linear(d, d, bias=bias) for _ in range(n))
    directory.mkdir(parents=True)
    torch.save(translators.state_dict(), directory / PARAMS_FILE)
    config = {"base_model_name_or_path": f"someone/{model.name}", "d_model": d,
              "num_hidden_layers": n, "bias": bias, "base_model_revision": None,
              "unembed_hash": unembedding_hash(model.W_U), "lens_type": "linear_tuned_lens",
              **config_changes}
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    return translators


@pytest.mark.parametrize("bias", [True, False])
def test_a_lens_saved_by_the_tuned_lens_package_loads_and_decodes_the_same(tiny_models, tmp_path,
                                                                          bias):
    model = tiny_models["tiny-llama"]
    translators = _package_lens(model, tmp_path / "tuned" / "tiny-llama", bias=bias)
    config = RunConfig(tuned="on", tuned_dir=tmp_path / "tuned")
    unembed = Unembed(model.W_U, model.b_U, dtype=F64)
    res = resolve_tuned(config, name="tiny-llama", model=model, unembed=unembed, norms=model.norms)
    assert res.summary["compatible"] and res.summary["format"] == "tuned-lens"
    h = _resids(model)[2]
    with torch.no_grad():
        moved = h + translators[2].double()(h)
    expected = model.norms[-1](moved) @ model.W_U
    torch.testing.assert_close(res.lens.forward(h, 2), expected)


# --------------------------------------------------------------------------- refusal


def _ours_with(model, **facts):
    art = _random(model)
    return TunedArtifacts(weight=art.weight, bias=art.bias, config=art.config,
                          provenance={**art.provenance, "model": {**art.provenance["model"],
                                                                  **facts}})


MISMATCHES = {
    "d_model": (lambda m: _ours_with(m, d_model=64), "d_model 64 vs 32"),
    "layers": (lambda m: _ours_with(m, n_layers=7), "n_layers 7 vs 4"),
    "d_vocab": (lambda m: _ours_with(m, d_vocab=5), "d_vocab 5 vs"),
    "unembedding": (lambda m: _ours_with(m, unembed_hash="0" * 64),
                    "unembed_hash 000000000000… vs"),
    "name": (lambda m: _ours_with(m, name="other-model"), "name 'other-model' vs 'tiny-llama'"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
@pytest.mark.parametrize("mode", ["on", "auto"])
def test_artifacts_of_another_model_are_refused_in_one_line(case, mode, tiny_models, tmp_path):
    model = tiny_models["tiny-llama"]
    make, expected = MISMATCHES[case]
    make(model).save(tmp_path / "tiny-llama")
    config = RunConfig(tuned=mode, tuned_dir=tmp_path)
    unembed = Unembed(model.W_U, model.b_U, dtype=F64)
    if mode == "on":
        with pytest.raises(LensError, match="^--tuned on: ") as info:
            resolve_tuned(config, name="tiny-llama", model=model, unembed=unembed,
                          norms=model.norms)
        message = str(info.value)
    else:
        res = resolve_tuned(config, name="tiny-llama", model=model, unembed=unembed,
                            norms=model.norms)
        assert res.lens is None and not res.summary["compatible"]
        message = res.summary["error"]
    assert "belong to another model" in message and expected in message
    assert "\n" not in message


def test_package_lens_with_other_layer_count_is_refused(tiny_models, tmp_path):
    model = tiny_models["tiny-llama"]
    _package_lens(model, tmp_path / "tiny-llama")
    cfg = json.loads((tmp_path / "tiny-llama" / CONFIG_FILE).read_text())
    (tmp_path / "tiny-llama" / CONFIG_FILE).write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(Exception, match="i < 3"):
        load_artifacts(tmp_path / "tiny-llama")


def test_model_id_differing_only_in_path_is_a_warning(tiny_models, tmp_path):
    model = tiny_models["tiny-llama"]
    _ours_with(model, model_id="/elsewhere/tiny-llama").save(tmp_path / "tiny-llama")
    res = resolve_tuned(RunConfig(tuned_dir=tmp_path), name="tiny-llama", model=model,
                        unembed=Unembed(model.W_U, model.b_U, dtype=F64), norms=model.norms)
    assert res.lens is not None and "/elsewhere/tiny-llama" in res.summary["warning"]


# --------------------------------------------------------------------------- fit and run


@pytest.fixture(scope="module")
def llama_tuned(tmp_path_factory) -> Path:
    """A tuned lens fitted on tiny-llama by the CLI: ``<dir>/tiny-llama/``."""
    root = tmp_path_factory.mktemp("tuned") / "tuned"
    text = root.parent / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(REPO), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = tuned_fit.main(["tests/models/tiny-llama", "--dtype", "float64", "--text-file",
                                 str(text), "--tuned-dir", str(root), "--window", "24",
                                 "--windows", "60", "--steps", "30"])
    assert status == 0, err.getvalue()
    assert "held-out KL" in out.getvalue() and "beats the logit lens" in out.getvalue()
    return root


def test_fit_lowers_held_out_kl_below_the_logit_lens_at_every_inner_layer(llama_tuned):
    p = load_artifacts(llama_tuned / "tiny-llama").provenance
    rows = p["held_out_kl_bits"]
    assert [r["layer"] for r in rows] == list(range(5))
    assert p["text"]["held_out_positions"] == rows[0]["positions"] > 0
    for r in rows[1:-1]:
        assert r["tuned"] < 0.8 * r["logit"], r
        assert r["head_to_lens"]["tuned"] < r["head_to_lens"]["logit"], r
    assert rows[-1]["tuned"] == rows[-1]["logit"] < 1e-9  # the last layer is the head
    assert p["verdict"]["beats_logit_lens"] and p["training"]["steps"] == 30


def test_fit_is_deterministic(tiny_models):
    model = tiny_models["tiny-gpt2"]
    a = tuned_fit.fit(model, TEXT, source="t", window=16, count=20, steps=3, batch=8)
    b = tuned_fit.fit(model, TEXT, source="t", window=16, count=20, steps=3, batch=8)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert a.provenance["held_out_kl_bits"] == b.provenance["held_out_kl_bits"]


def test_run_writes_tuned_sidecars_with_the_primary_headers(llama_tuned, run_lens):
    name = "tiny-llama"
    status, files, err = run_lens(f"tests/models/{name}", "--dtype", "float64", "--tuned", "on",
                                  "--tuned-dir", str(llama_tuned))
    assert status == 0, err
    for kind in ("records", "pure-next-token"):
        primary = read_csv_rows(files[f"output-{name}-{kind}.csv"])
        side = read_csv_rows(files[f"output-{name}-{kind}-tuned.csv"])
        assert primary[0] == side[0] and [r[:5] for r in primary] == [r[:5] for r in side]
    summary = json.loads(files[f"output-{name}.json"])["diagnostics"]["tuned_summary"]
    assert summary == {"mode": "on", "artifact_path": str(llama_tuned / name), "present": True,
                       "compatible": True, "format": "lens", "layers": 4, "error": None,
                       "warning": None}


def test_tuned_on_without_artifacts_fails_before_loading(run_lens, tmp_path):
    status, files, err = run_lens("tests/models/tiny-gpt2", "--tuned", "on", "--tuned-dir",
                                  str(tmp_path))
    assert status == 1 and err.count("\n") == 1
    assert f"--tuned on: no tuned-lens artifacts at {tmp_path / 'tiny-gpt2'}" in err
    assert json.loads(files["output-tiny-gpt2.error.json"])["stage"] == "resolve"  # before load
