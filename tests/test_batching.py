"""Batched forward passes: each prompt's results in a padded batch equal its single-prompt results."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from lens.config import RunConfig
from lens.model import capture, capture_batch, head_logits, load_model, tokenize
from lens.records import NextTokenRecord, PositionRecord
from lens.passes import passes_for
from lens.probe import default_probe, load_probe
from lens.outputs import run_files as output_files
from lens.report import analyse, build_analysis
from lens.testing import REPO, TINY_MODELS
from lens.writers import read_csv_rows

PROMPTS = (  # different lengths, so every row but the longest is padded
    "Give the city name only, plain text. The capital of Germany is called simply",
    "Germany has its capital at",
    "In Germany the capital city is known as",
    "The capital of France is called simply",
)
TOL = 1e-5
TINY_PROBE = Path(__file__).resolve().parent / "probes" / "tiny-multi.yaml"


@pytest.fixture(scope="module")
def float32_models():  # type: ignore[no-untyped-def]
    """The tiny models in float32, the CPU default dtype (read-only)."""
    with contextlib.chdir(REPO):
        return {n: load_model(f"tests/models/{n}", device="cpu", dtype="float32")
                for n in TINY_MODELS}


def _models(request, dtype: str):  # type: ignore[no-untyped-def]
    return request.getfixturevalue("tiny_models" if dtype == "float64" else "float32_models")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", TINY_MODELS)
def test_batched_capture_equals_single(request, name, side, dtype):
    model = _models(request, dtype)[name]
    batch = [tokenize(model, p) for p in PROMPTS]
    assert len({len(ids) for ids in batch}) > 1
    caps = capture_batch(model, batch, padding_side=side)
    for ids, cap in zip(batch, caps, strict=True):
        alone = capture(model, ids)
        assert cap.resids.shape == alone.resids.shape == (model.n_layers + 1, len(ids), model.d_model)
        assert cap.head_logits.shape == alone.head_logits.shape
        probs = torch.softmax(cap.head_logits.double(), -1)
        assert torch.allclose(probs, torch.softmax(alone.head_logits.double(), -1), rtol=0, atol=TOL)
        scale = float(alone.resids.abs().max())
        tol = (1e-10 if dtype == "float64" else 1e-4) * scale
        assert torch.allclose(cap.resids, alone.resids, rtol=0, atol=tol)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", TINY_MODELS)
def test_pass_results_from_a_batch_equal_single_prompt_results(tiny_models, name, side):
    """Through the Pass template: every record's probabilities agree within 1e-5."""
    model = tiny_models[name]
    analysis = build_analysis(model, RunConfig(dtype="float64"))
    passes = passes_for(default_probe().facts[0])
    caps = capture_batch(model, [p.token_ids(analysis) for p in passes], padding_side=side)
    for p, cap in zip(passes, caps, strict=True):
        batched, alone = p.run(analysis, cap).records, p.run(analysis).records
        assert len(batched) == len(alone)
        for b, a in zip(batched, alone, strict=True):
            assert type(b) is type(a)
            if isinstance(a, PositionRecord | NextTokenRecord):
                assert (b.lens, b.prompt_id, b.variant, b.layer, b.pos) == (
                    a.lens, a.prompt_id, a.variant, a.layer, a.pos)
                assert abs(b.entropy - a.entropy) < TOL
                for (tb, pb), (ta, pa) in zip(b.topk, a.topk, strict=True):
                    assert abs(pb - pa) < TOL and (tb == ta or abs(pb - pa) < TOL)
            if isinstance(a, NextTokenRecord):
                assert abs(b.p_top1 - a.p_top1) < TOL
                assert (b.p_answer is None) == (a.p_answer is None)
                if a.p_answer is not None:
                    assert abs(b.p_answer - a.p_answer) < TOL
                assert abs(b.kl_to_final_bits - a.kl_to_final_bits) < TOL


@pytest.mark.parametrize("keeps_logits", [True, False])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", TINY_MODELS)
def test_head_logits_of_a_padded_batch_equal_each_prompt_alone(request, monkeypatch, name, dtype,
                                                               keeps_logits):
    """One padded forward for the head probes: each row is that prompt's last-position logits
    from its own forward (tightly) and from plain ``transformers`` (within 1e-5: the bridge's
    rotary numerics differ from HF's by ~1e-6 in float64), with ``logits_to_keep`` and without."""
    from transformers import AutoModelForCausalLM

    import lens.model

    model = _models(request, dtype)[name]
    if not keeps_logits:
        monkeypatch.setattr(lens.model, "keeps_logits", lambda bridge: False)
    batch = [tokenize(model, p) for p in PROMPTS]
    rows = head_logits(model, batch)
    assert rows.shape == (len(PROMPTS), model.d_vocab)
    hf = AutoModelForCausalLM.from_pretrained(REPO / "tests" / "models" / name,
                                              dtype=getattr(torch, dtype)).eval()
    tol = 1e-10 if dtype == "float64" else 1e-4
    for ids, row in zip(batch, rows, strict=True):
        alone = capture(model, ids).head_logits[-1]
        scale = float(alone.abs().max())
        assert torch.allclose(row, alone, rtol=0, atol=tol * scale)
        with torch.no_grad():
            plain = hf(torch.tensor([ids])).logits[0, -1]
        assert torch.allclose(row, plain, rtol=0, atol=1e-5 * scale)
    assert head_logits(model, []).shape == (0, model.d_vocab)


def test_capture_batch_rejects_a_bad_side(tiny_models):
    model = tiny_models["tiny-gpt2"]
    with pytest.raises(ValueError, match="padding_side"):
        capture_batch(model, [tokenize(model, PROMPTS[1])], padding_side="middle")
    assert capture_batch(model, []) == []


def test_pass_refuses_a_capture_of_another_prompt(tiny_models):
    model = tiny_models["tiny-llama"]
    analysis = build_analysis(model, RunConfig(dtype="float64"))
    orig = passes_for(default_probe().facts[0])[0]
    other = capture(model, tokenize(model, PROMPTS[1]))
    with pytest.raises(ValueError, match="positions"):
        orig.run(analysis, other)


def _cells(data: bytes) -> list[list[str]]:
    return read_csv_rows(data)


def _same_numbers(a: bytes, b: bytes) -> bool:
    for row_a, row_b in zip(_cells(a), _cells(b), strict=True):
        for x, y in zip(row_a, row_b, strict=True):
            if x == y:
                continue
            try:
                if abs(float(x) - float(y)) > 1e-9 + 1e-8 * abs(float(y)):
                    return False
            except ValueError:
                return False
    return True


@pytest.mark.parametrize("name", TINY_MODELS)
def test_batch_size_does_not_change_the_outputs(tiny_models, name):
    probe = load_probe(TINY_PROBE)
    runs = {size: output_files(analyse(tiny_models[name], probe,
                                       RunConfig(dtype="float64", batch_size=size)), RunConfig())
            for size in (1, 3, 8)}
    for size in (3, 8):
        for file in (f"output-{name}-records.csv", f"output-{name}-pure-next-token.csv"):
            assert _same_numbers(runs[size][file], runs[1][file]), (size, file)


def test_one_fact_probe_runs_unbatched(tiny_models, monkeypatch):
    """A one-fact probe keeps the single-prompt path: its bytes are the goldens' bytes."""
    import lens.forwards

    def fail(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("capture_batch called for a one-fact probe")

    monkeypatch.setattr(lens.forwards, "capture_batch", fail)
    analyse(tiny_models["tiny-gpt2"], default_probe(), RunConfig(dtype="float64", batch_size=8))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", TINY_MODELS)
def test_a_batch_with_the_head_at_the_last_positions_only(request, name, dtype):
    """``last_head``: the model's head runs on each prompt's last position (and enough
    others for 12 rows); the residuals are those of the head over every position, bit
    for bit, and so is that position's head up to the matmul's rounding (MKL's float32
    matmul of SmolLM2's head gives the same bits from 12 rows on: benchmarks/README.md)."""
    from lens.headpositions import HEAD_ROWS, head_rows, keeps_logits

    model = _models(request, dtype)[name]
    assert keeps_logits(model.hf_model)
    for batch in ([tokenize(model, p) for p in PROMPTS], [tokenize(model, PROMPTS[0])]):
        full = capture_batch(model, batch)
        last = capture_batch(model, batch, last_head=True)
        for a, b in zip(full, last, strict=True):
            assert b.head_logits.shape == (1, model.d_vocab)
            tol = 1e-12 if dtype == "float64" else 1e-5
            torch.testing.assert_close(b.head_logits[0], a.head_logits[-1], rtol=tol, atol=tol)
            assert torch.equal(b.resids, a.resids)
    spans = [slice(0, n) for n in (5, 9, 9)]
    rows = head_rows(spans, 9)
    assert {4, 8} <= set(rows) and rows == sorted(set(rows))
    assert len(rows) * len(spans) >= HEAD_ROWS and rows[-2:] == [7, 8]
    assert head_rows([slice(0, 3)], 3) == [0, 1, 2]  # fewer than 12 rows: every position
