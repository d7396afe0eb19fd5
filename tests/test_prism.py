"""Prism (README, Prism): fitting maths, the lens, artifacts, sidecar CSVs (goldens) and errors.

The goldens pin both sidecar CSVs of a tiny-llama float64 run whose artifacts
are fitted inside the test from ``TINY_PROMPTS`` (words of the tiny
vocabulary), so they pin the fit as well as the decoding.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lens import prism_fit
from lens.artifacts import ModelFacts
from lens.checks import check_emitter
from lens.config import RunConfig, default_probe
from lens.decode import decode_steps
from lens.lenses import NormLens
from lens.model import capture, capture_batch, tokenize
from lens.passes import OrigPass
from lens.prism import EPS, PrismArtifacts, PrismLens, load_artifacts
from lens.prism_maths import (
    Reservoir,
    RunningMoments,
    orthogonality_error,
    principal_axes,
    procrustes,
    reorthonormalise,
    unembedding_basis,
    whiten,
)
from lens.report import build_analysis
from lens.testing import REPO, TINY_MODELS
from lens.unembed import Unembed
from lens.writers import read_csv_rows

FAST = settings(max_examples=50, deadline=None)
F64 = torch.float64
TINY_PROMPTS = [
    "Give the city name only, plain text. The capital of Germany is called simply",
    "The capital of France is called simply Paris",
    "Berlin is the capital of Germany",
    "Germany's capital city is called simply Berlin",
    "The capital city of Germany is named simply",
    "Germany has its capital at the city called simply",
    "In Germany the capital city is known as",
    "In Germany, the capital city is known as",
    "Answer word Answer: Rome Madrid Vienna Tokyo London Europe",
    "Give the country name only, plain text. Berlin is the capital of",
    "The city of Rome is the capital of",
    "Tokyo London Madrid Vienna Paris Berlin",
]
PROMPT = default_probe().facts[0].prompt


# --------------------------------------------------------------------------- Procrustes


@st.composite
def procrustes_inputs(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    d = draw(st.integers(1, 16))
    vocab = draw(st.integers(1, 40))
    k = draw(st.integers(1, d))
    gen = torch.Generator().manual_seed(seed)
    W_U = torch.randn(d, vocab, generator=gen, dtype=F64) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    return W_U, basis[:, :k]


@FAST
@given(procrustes_inputs())
def test_Q_is_orthogonal_for_random_unembeddings_and_bases(inputs):
    W_U, E_k = inputs
    U, _ = unembedding_basis(W_U)
    Q, _ = procrustes(E_k, U[:, :E_k.shape[1]])
    assert Q.shape == (W_U.shape[0], W_U.shape[0])
    assert orthogonality_error(Q) < 1e-4


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(1, 12))
def test_full_rank_Q_sends_each_principal_axis_onto_its_singular_vector(seed, d):
    """Row convention: ``e_i @ Q = u_i`` (the usual column-vector ``U Vᵀ``, transposed)."""
    gen = torch.Generator().manual_seed(seed)
    E, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    U, rank = unembedding_basis(torch.randn(d, 3 * d, generator=gen, dtype=F64))
    assert rank == d
    Q, refit = procrustes(E, U)
    assert not refit
    torch.testing.assert_close(E.T @ Q, U.T, rtol=0, atol=1e-10)


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(1, 12), st.floats(1e-3, 0.3))
def test_qr_fallback_returns_a_nearby_orthogonal_matrix(seed, d, noise):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    bent = Q + noise * torch.randn(d, d, generator=gen, dtype=F64) / d
    fixed = reorthonormalise(bent)
    assert orthogonality_error(fixed) < 1e-10
    assert float((fixed - Q).abs().max()) < 10 * noise


def test_unembedding_basis_rank_and_order():
    gen = torch.Generator().manual_seed(1)
    low = torch.randn(6, 2, generator=gen, dtype=F64) @ torch.randn(2, 30, generator=gen, dtype=F64)
    U, rank = unembedding_basis(low)
    assert rank == 2
    sv = torch.linalg.svdvals(low)
    torch.testing.assert_close((U[:, :2].T @ low).norm(dim=1), sv[:2])


def test_principal_axes_are_the_directions_of_largest_variance():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(500, 3, generator=gen, dtype=F64) * torch.tensor([0.1, 5.0, 1.0], dtype=F64)
    axes = principal_axes(x, 2)
    assert axes.shape == (3, 2)
    assert int(axes[:, 0].abs().argmax()) == 1 and int(axes[:, 1].abs().argmax()) == 2
    assert bool((axes.abs().max(dim=0).values == axes.max(dim=0).values).all())  # signs fixed


# --------------------------------------------------------------------------- Welford, whitening


@st.composite
def data_and_splits(draw, min_rows=1):
    rows = draw(st.integers(min_rows, 40))
    cols = draw(st.integers(1, 5))
    x = draw(hnp.arrays(np.float64, (rows, cols),
                        elements=st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)))
    cuts = sorted(draw(st.lists(st.integers(0, rows), max_size=6)))
    return torch.from_numpy(x), cuts


def _chunks(x, cuts):
    bounds = [0, *cuts, x.shape[0]]
    return [x[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@FAST
@given(data_and_splits())
@example((torch.tensor([[1e3], [1e3 - 1e-9]], dtype=F64), [1]))
def test_welford_equals_whole_batch_moments_for_any_split(data):
    x, cuts = data
    moments = RunningMoments(x.shape[1], dtype=F64)
    for chunk in _chunks(x, cuts):
        moments.update(chunk)
    assert moments.count == x.shape[0]
    torch.testing.assert_close(moments.mean, x.mean(dim=0), rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(moments.var, x.var(dim=0, unbiased=False), rtol=1e-9, atol=1e-7)


@FAST
@given(data_and_splits(min_rows=2))
def test_whitening_gives_zero_mean_unit_variance_on_its_fitting_sample(data):
    x, cuts = data
    assume(bool((x.var(dim=0, unbiased=False) > 1e-2).all()))
    moments = RunningMoments(x.shape[1], dtype=F64)
    for chunk in _chunks(x, cuts):
        moments.update(chunk)
    z = whiten(x, moments.mean, moments.var, EPS)
    torch.testing.assert_close(z.mean(dim=0), torch.zeros(x.shape[1], dtype=F64), rtol=0, atol=1e-9)
    torch.testing.assert_close(z.var(dim=0, unbiased=False), torch.ones(x.shape[1], dtype=F64),
                               rtol=0, atol=1e-6)


def test_welford_in_float32_stays_close_over_a_long_stream():
    gen = torch.Generator().manual_seed(3)
    x = 100.0 + torch.randn(20000, 4, generator=gen, dtype=F64)
    moments = RunningMoments(4, dtype=torch.float32)
    for chunk in x.split(37):
        moments.update(chunk)
    torch.testing.assert_close(moments.var.double(), x.var(dim=0, unbiased=False),
                               rtol=1e-4, atol=0)


# --------------------------------------------------------------------------- reservoir


def test_reservoir_keeps_everything_under_capacity():
    x = torch.arange(30, dtype=F64).reshape(10, 3)
    res = Reservoir(50, seed=0, dtype=F64)
    for chunk in x.split(4):
        res.add(chunk)
    assert torch.equal(res.sample(), x) and res.seen == 10


@FAST
@given(st.integers(1, 20), st.integers(0, 2**31 - 1), st.lists(st.integers(0, 15), max_size=8))
def test_reservoir_is_a_seeded_subset_of_the_stream(capacity, seed, sizes):
    rows = torch.arange(float(sum(sizes)), dtype=F64)[:, None]
    def fill(s):
        res = Reservoir(capacity, seed=s, dtype=F64)
        for chunk in rows.split(sizes) if sizes else ():
            res.add(chunk)
        return res
    res = fill(seed)
    if not sizes or sum(sizes) == 0:
        return
    kept = res.sample()
    assert kept.shape[0] == min(capacity, rows.shape[0])
    assert len(set(kept[:, 0].tolist())) == kept.shape[0]  # distinct rows of the stream
    assert set(kept[:, 0].tolist()) <= set(rows[:, 0].tolist())
    assert torch.equal(fill(seed).sample(), kept)


def test_reservoir_is_roughly_uniform():
    rows = torch.arange(1000.0, dtype=F64)[:, None]
    counts = torch.zeros(1000)
    for seed in range(200):
        res = Reservoir(100, seed=seed, dtype=F64)
        for chunk in rows.split(64):
            res.add(chunk)
        counts[res.sample()[:, 0].long()] += 1
    # each row is kept with probability 0.1: 20 expected per row over 200 seeds
    assert abs(float(counts[:500].mean()) - float(counts[500:].mean())) < 2.0


# --------------------------------------------------------------------------- the lens


def _identity_artifacts(d: int, dtype=F64, *, facts=None, beats: bool = False) -> PrismArtifacts:
    """Identity whitening and Q; with ``facts``, a provenance naming that model (with ``d``)."""
    provenance = {"k": d, "layers": [1]}
    if facts is not None:
        facts = {**facts, "d_model": d}
        provenance.update(model=facts, verdict={"beats_logit_lens": beats, "reason": "test"})
    return PrismArtifacts(mean=torch.zeros(d, dtype=dtype), var=torch.ones(d, dtype=dtype), eps=0.0,
                          Q=torch.eye(d, dtype=dtype), provenance=provenance)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_identity_prism_reproduces_the_norm_lens_exactly(tiny_models, name):
    model = tiny_models[name]
    unembed = Unembed(model.W_U, model.b_U, dtype=model.dtype)
    norm = NormLens(unembed, model.norms)
    prism = PrismLens(unembed, model.norms, _identity_artifacts(model.d_model))
    resids = capture(model, tokenize(model, PROMPT)).resids
    layers = list(range(model.n_layers + 1))
    for layer in layers:
        assert torch.equal(prism.forward(resids[layer], layer), norm.forward(resids[layer], layer))
    assert torch.equal(prism.decode(resids, layers), norm.decode(resids, layers))


def test_prism_lens_applies_whitening_then_Q_then_the_unembedding(tiny_models):
    model = tiny_models["tiny-gpt2"]
    gen = torch.Generator().manual_seed(4)
    d = model.d_model
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    art = PrismArtifacts(mean=torch.randn(d, generator=gen, dtype=F64),
                         var=torch.rand(d, generator=gen, dtype=F64) + 0.5, eps=EPS, Q=Q,
                         provenance={})
    unembed = Unembed(model.W_U, model.b_U, dtype=F64)
    resid = capture(model, tokenize(model, PROMPT)).resids[2]
    expected = ((model.norms[2](resid) - art.mean) / torch.sqrt(art.var + EPS)) @ Q @ model.W_U
    expected = expected if model.b_U is None else expected + model.b_U
    torch.testing.assert_close(PrismLens(unembed, model.norms, art).forward(resid, 2), expected)


# --------------------------------------------------------------------------- fitting


def _fit(name: str, prism_dir: Path, prompts=TINY_PROMPTS, *extra: str) -> tuple[int, str, str]:
    prompts_file = prism_dir.parent / f"{prism_dir.name}-prompts.txt"
    prompts_file.write_text("# tiny prompts\n\n" + "\n".join(prompts) + "\n", encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(REPO), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = prism_fit.main([f"tests/models/{name}", "--dtype", "float64", "--device", "cpu",
                                 "--prompts-file", str(prompts_file), "--prism-dir", str(prism_dir),
                                 *extra])
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def llama_prism(tmp_path_factory) -> Path:
    """Artifacts fitted on tiny-llama (float64) from TINY_PROMPTS: ``<dir>/tiny-llama/``."""
    root = tmp_path_factory.mktemp("prism") / "prisms"
    status, _, err = _fit("tiny-llama", root)
    assert status == 0, err
    return root


def test_fit_reports_k_layers_and_held_out_kl(tmp_path):
    status, out, err = _fit("tiny-gpt2", tmp_path / "prisms")
    assert status == 0, err
    assert "k lowered from 512 to 32" in out and "d_model is 32" in out
    assert "held-out KL" in out and "norm" in out and "prism" in out
    art = load_artifacts(tmp_path / "prisms" / "tiny-gpt2")
    p = art.provenance
    assert (p["k"], p["k_requested"], p["layers"]) == (32, 512, [2, 3, 4])
    assert "d_model is 32" in p["k_lowered_reason"]
    counts = p["sample_counts"]
    assert counts["vectors_total"] == sum(counts["vectors_per_layer"].values())
    assert counts["distinct_vectors"] > 32
    assert p["prompts"]["held_out"] == [TINY_PROMPTS[4], TINY_PROMPTS[9]]
    assert len(p["prompts"]["fit"]) == 10
    assert set(p["versions"]) >= {"torch", "transformers", "transformer-lens", "lens"}
    rows = p["held_out_kl_bits"]
    assert [r["layer"] for r in rows] == [2, 3, 4]
    assert all(r["norm"] >= 0 and r["prism"] >= 0 and r["positions"] > 0 for r in rows)
    assert rows[-1]["norm"] < 1e-9  # the last layer through ln_final is the model's head
    assert orthogonality_error(art.Q) < 1e-5 and art.Q.dtype == torch.float32
    assert math.isclose(p["q_orthogonality_error"], orthogonality_error(art.Q), rel_tol=1e-9)


def test_fit_is_deterministic(tiny_models):
    model = tiny_models["tiny-llama"]
    a = prism_fit.fit(model, TINY_PROMPTS, source="test").artifacts
    b = prism_fit.fit(model, TINY_PROMPTS, source="test").artifacts
    for x, y in ((a.mean, b.mean), (a.var, b.var), (a.Q, b.Q)):
        assert torch.equal(x, y)
    strip = lambda p: {k: v for k, v in p.items() if k not in ("date", "seconds")}  # noqa: E731
    assert strip(a.provenance) == strip(b.provenance)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_batched_capture_matches_one_prompt_at_a_time(tiny_models, name):
    model = tiny_models[name]
    ids = [tokenize(model, p) for p in TINY_PROMPTS[:4]]
    assert len({len(i) for i in ids}) > 1  # padding is exercised
    for one, batched in zip(ids, capture_batch(model, ids), strict=True):
        single = capture(model, one)
        assert batched.resids.shape == single.resids.shape
        torch.testing.assert_close(batched.resids, single.resids, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(batched.head_logits, single.head_logits, rtol=1e-12, atol=1e-12)


def test_fit_does_not_depend_on_batching(tiny_models, monkeypatch):
    model = tiny_models["tiny-gpt2"]
    wide = prism_fit.fit(model, TINY_PROMPTS, source="test").artifacts
    monkeypatch.setattr(prism_fit, "BATCH_TOKENS", 20)
    narrow = prism_fit.fit(model, TINY_PROMPTS, source="test").artifacts
    for x, y in ((wide.mean, narrow.mean), (wide.var, narrow.var), (wide.Q, narrow.Q)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_fit_lowers_k_to_the_sample(tiny_models):
    model = tiny_models["tiny-llama"]
    few = ["Berlin Paris", "Rome Madrid", "Tokyo London", "Vienna Europe", "Paris Berlin"]
    result = prism_fit.fit(model, few, source="test", k_requested=20)
    p = result.artifacts.provenance
    distinct = p["sample_counts"]["distinct_vectors"]
    assert p["k"] == distinct - 1 < 20
    assert "distinct fit vectors - 1" in p["k_lowered_reason"]
    assert any("k lowered from 20" in m for m in result.messages)
    assert orthogonality_error(result.artifacts.Q) < 1e-5


def test_builtin_prompt_set_is_large_and_varied():
    prompts, source = prism_fit.read_prompts(None)
    assert source == "built-in" and len(prompts) >= 100 and len(set(prompts)) == len(prompts)
    assert sum("Germany" in p or "Berlin" in p for p in prompts) <= 2


@pytest.mark.parametrize("args,expected", [
    (["--prompts-file", "no/such/file.txt"], "does not exist"),
    (["--k", "0"], "--k must be at least 1"),
])
def test_fit_bad_input_gives_one_line(args, expected, tmp_path, capsys):
    status = prism_fit.main(["tests/models/tiny-llama", "--prism-dir", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert status == 1 and len(err.strip().splitlines()) == 1 and expected in err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_fit_needs_enough_prompts(tmp_path):
    status, _, err = _fit("tiny-llama", tmp_path / "prisms", TINY_PROMPTS[:3])
    assert status == 1 and "at least 5 prompts" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- the sidecar


def test_sidecar_emitters_conform(tiny_models, llama_prism):
    model = tiny_models["tiny-llama"]
    analysis = build_analysis(model, RunConfig(dtype="float64", prism="on", prism_dir=llama_prism))
    logit, prism = analysis.sidecar_lenses
    assert logit.name == "logit" and isinstance(prism, PrismLens)
    orig = OrigPass(default_probe().facts[0])
    ids = tokenize(model, PROMPT)
    cap = capture(model, ids)
    ctx = orig.context(analysis, cap, ids)
    steps = [s.kept() for s in decode_steps(ctx, prism, cap.resids)]
    (route,) = [r for r in orig.routes(analysis) if r.lens is prism]
    assert route.rows == "all" and len(route.emitters) == 2
    for emitter in route.emitters:
        for step in (steps[0], steps[-1]):
            records = check_emitter(emitter, step)
            assert records and all(r.lens == "prism" for r in records)


def _rows(data: bytes) -> list[list[str]]:
    return read_csv_rows(data)


def _without_prism_summary(data: bytes) -> dict:
    report = json.loads(data)
    del report["diagnostics"]["prism_summary"]
    report["diagnostics"]["lens_summaries"].pop("prism", None)
    return report


def test_sidecar_csvs_match_golden(llama_prism, run_lens, golden_csv):
    name = "tiny-llama"
    args = (f"tests/models/{name}", "--dtype", "float64", "--device", "cpu")
    status, files, err = run_lens(*args, "--prism", "on", "--prism-dir", str(llama_prism))
    assert status == 0, err
    assert files[f"output-{name}-records-prism.csv"] == golden_csv(name="records-prism")
    assert (files[f"output-{name}-pure-next-token-prism.csv"]
            == golden_csv(name="pure-next-token-prism"))

    summary = json.loads(files[f"output-{name}.json"])["diagnostics"]["prism_summary"]
    # the tiny model's Prism does not beat the logit lens: `on` uses it, with a warning
    assert summary == {"mode": "on", "artifact_path": str(llama_prism / name), "present": True,
                       "compatible": True, "k": 32, "layers": [2, 3, 4], "error": None,
                       "warning": "it does not beat the logit lens (held-out KL above the "
                                  "logit lens's at 3 of 3 fitted depths)"}

    status, plain, err = run_lens(*args, "--prism", "off")
    assert status == 0, err
    assert f"output-{name}-records-prism.csv" not in plain
    for fname in (f"output-{name}-records.csv", f"output-{name}-pure-next-token.csv"):
        assert files[fname] == plain[fname]
    assert (_without_prism_summary(files[f"output-{name}.json"])
            == _without_prism_summary(plain[f"output-{name}.json"]))

    # same schemas, same rows (passes, layers, positions), other numbers
    for base, side in (("records", "records-prism"), ("pure-next-token", "pure-next-token-prism")):
        a, b = _rows(files[f"output-{name}-{base}.csv"]), _rows(files[f"output-{name}-{side}.csv"])
        assert a[0] == b[0] and len(a) == len(b)
        assert [r[:5] for r in a] == [r[:5] for r in b]
        assert a != b
    pure = _rows(files[f"output-{name}-pure-next-token-prism.csv"])
    margin = pure[0].index("control_margin")
    assert all((r[margin] != "") == (r[0] == "ctl") for r in pure[1:])


def test_auto_refuses_artifacts_that_do_not_beat_the_logit_lens(llama_prism, run_lens):
    status, files, err = run_lens("tests/models/tiny-llama", "--dtype", "float64",
                                  "--prism-dir", str(llama_prism))
    assert status == 0, err
    assert "output-tiny-llama-pure-next-token-prism.csv" not in files
    summary = json.loads(files["output-tiny-llama.json"])["diagnostics"]["prism_summary"]
    assert summary["mode"] == "auto" and not summary["compatible"]
    assert "does not beat the logit lens" in summary["error"] and "--prism on" in summary["error"]


def test_auto_uses_artifacts_whose_verdict_beats_the_logit_lens(tiny_models, run_lens, tmp_path):
    facts = ModelFacts.of(tiny_models["tiny-llama"]).as_json()
    _identity_artifacts(32, facts=facts, beats=True).save(
        tmp_path / "tiny-llama")
    status, files, err = run_lens("tests/models/tiny-llama", "--dtype", "float64",
                                  "--prism-dir", str(tmp_path))
    assert status == 0, err
    assert "output-tiny-llama-pure-next-token-prism.csv" in files
    summary = json.loads(files["output-tiny-llama.json"])["diagnostics"]["prism_summary"]
    assert summary["mode"] == "auto" and summary["compatible"] and summary["error"] is None


# --------------------------------------------------------------------------- bad artifacts


def _missing(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)


def _narrow(src: Path, dst: Path) -> None:
    facts = json.loads((src / "tiny-llama" / "provenance.json").read_text())["model"]
    _identity_artifacts(16, facts=facts, beats=True).save(dst / "tiny-llama")


def _truncate(file: str):
    def make(src: Path, dst: Path) -> None:
        shutil.copytree(src, dst)
        target = dst / "tiny-llama" / file
        target.write_bytes(target.read_bytes()[:60])
    return make


def _bad_provenance(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    (dst / "tiny-llama" / "provenance.json").write_text('{"k": 32, "layers": [2, 3',
                                                        encoding="utf-8")


def _partial(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    (dst / "tiny-llama" / "Q_prism.pt").unlink()


BAD_ARTIFACTS = {
    "missing": (_missing, "no Prism artifacts at {dir}"),
    "d_model": (_narrow, "d_model 16 vs 32"),
    "truncated-whiten": (_truncate("whiten.pt"), "cannot read {dir}/whiten.pt"),
    "truncated-Q": (_truncate("Q_prism.pt"), "cannot read {dir}/Q_prism.pt"),
    "invalid-provenance": (_bad_provenance, "invalid {dir}/provenance.json"),
    "partial": (_partial, "missing Q_prism.pt"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARTIFACTS))
def test_bad_artifacts_with_prism_on_fail_in_one_line(case, llama_prism, run_lens, tmp_path):
    make, expected = BAD_ARTIFACTS[case]
    root = tmp_path / "bad-prisms"
    make(llama_prism, root)
    expected = expected.format(dir=root / "tiny-llama")
    status, files, err = run_lens("tests/models/tiny-llama", "--dtype", "float64", "--prism", "on",
                                  "--prism-dir", str(root))
    lines = err.strip().splitlines()
    assert status == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("lens: error: --prism on: ") and expected in lines[0]
    assert not any(n.startswith("output-") and not n.endswith(".error.json") for n in files)


@pytest.mark.parametrize("case", sorted(BAD_ARTIFACTS))
def test_bad_artifacts_with_prism_auto_are_recorded(case, llama_prism, tiny_models, tmp_path):
    make, expected = BAD_ARTIFACTS[case]
    root = tmp_path / "bad-prisms"
    make(llama_prism, root)
    analysis = build_analysis(tiny_models["tiny-llama"],
                              RunConfig(dtype="float64", prism="auto", prism_dir=root))
    assert [lens.name for lens in analysis.sidecar_lenses] == ["logit"]
    summary = analysis.resolver_summaries["prism"]
    assert expected.format(dir=root / "tiny-llama") in summary["error"]
    assert "\n" not in summary["error"]
    assert summary["compatible"] is False and summary["artifact_path"] == str(root / "tiny-llama")
    assert (summary["k"], summary["layers"]) == (None, None)


def test_auto_with_broken_artifacts_runs_and_says_why(llama_prism, run_lens, tmp_path):
    root = tmp_path / "bad-prisms"
    _truncate("whiten.pt")(llama_prism, root)
    status, files, err = run_lens("tests/models/tiny-llama", "--dtype", "float64",
                                  "--prism-dir", str(root))
    assert status == 0 and err == ""
    summary = json.loads(files["output-tiny-llama.json"])["diagnostics"]["prism_summary"]
    assert summary["present"] is True and summary["compatible"] is False
    assert f"cannot read {root / 'tiny-llama' / 'whiten.pt'}" in summary["error"]
    assert "output-tiny-llama-records-prism.csv" not in files


def test_off_ignores_even_broken_artifacts(tmp_path, llama_prism, tiny_models):
    root = tmp_path / "bad"
    _truncate("whiten.pt")(llama_prism, root)
    analysis = build_analysis(tiny_models["tiny-llama"], RunConfig(prism="off", prism_dir=root))
    assert [lens.name for lens in analysis.sidecar_lenses] == ["logit"]
    assert dict(analysis.resolver_summaries["prism"]) == {
        "mode": "off", "artifact_path": str(root / "tiny-llama"), "present": True,
        "compatible": False, "k": None, "layers": None, "error": None, "warning": None}


def test_non_orthogonal_Q_is_refused(tmp_path):
    art = _identity_artifacts(8)
    bad = PrismArtifacts(mean=art.mean, var=art.var, eps=art.eps, Q=2 * art.Q, provenance={})
    bad.save(tmp_path)
    with pytest.raises(Exception, match="not orthogonal"):
        load_artifacts(tmp_path)
    assert math.isclose(orthogonality_error(2 * art.Q), math.sqrt(8 * 9))
