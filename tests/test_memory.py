"""Decode memory by construction: a chunk is half a pass at most, in buffers made once."""

from __future__ import annotations

import math

import pytest

from lens.config import RunConfig, default_probe
from lens.decode import decode_steps, slice_rows
from lens.model import capture, tokenize
from lens.passes import passes_for
from lens.report import build_analysis
from lens.testing import TINY_MODELS


def _steps(model, analysis=None):
    analysis = analysis or build_analysis(model, RunConfig(dtype="float64"))
    orig = passes_for(default_probe().facts[0])[0]
    ids = tokenize(model, orig.prompt())
    cap = capture(model, ids)
    return cap.resids, decode_steps(orig.context(analysis, cap, ids), analysis.lens, cap.resids)


def _spy_decode(monkeypatch, analysis):  # type: ignore[no-untyped-def]
    """Record the logits tensor every decode call returns (one call per chunk)."""
    calls = []
    decode = analysis.lens.decode

    def spy(resids, layers, **kwargs):  # type: ignore[no-untyped-def]
        logits = decode(resids, layers, **kwargs)
        calls.append((len(layers), logits))
        return logits

    monkeypatch.setattr(analysis.lens, "decode", spy)
    return calls


@pytest.mark.parametrize("name", TINY_MODELS)
def test_a_chunk_holds_at_most_half_the_pass(tiny_models, name, monkeypatch):
    model = tiny_models[name]
    analysis = build_analysis(model, RunConfig(dtype="float64"))
    calls = _spy_decode(monkeypatch, analysis)
    resids, steps = _steps(model, analysis)
    n_layers, seq, _ = resids.shape
    full = n_layers * seq * model.d_vocab  # one pass's logits, in elements
    half = math.ceil(n_layers / 2) * full // n_layers
    slices = (2 * slice_rows(model.d_vocab) - 1) * model.d_vocab  # the entropy's terms
    steps = list(steps)
    assert len(calls) >= 2 and all(logits.numel() <= half for _, logits in calls)
    for step in steps:  # logits and log-probs: one pass's logits at most, and one slice
        assert step.logits._base is not None and step.logits._base is step.logp._base
        assert step.logits._base.numel() <= 2 * half + min(slices, half)


def test_every_chunk_reuses_the_same_buffers(tiny_models, monkeypatch):
    """No allocation per chunk (each would cost page faults): one set of buffers per decode."""
    model = tiny_models["tiny-llama"]
    analysis = build_analysis(model, RunConfig(dtype="float64"))
    calls = _spy_decode(monkeypatch, analysis)
    _, steps = _steps(model, analysis)
    bases = {id(step.logits._base) for step in steps}
    assert len(calls) >= 2 and len(bases) == 1
    assert len({logits.untyped_storage().data_ptr() for _, logits in calls}) == 1


def test_entropy_with_a_reused_scratch_buffer_is_bit_identical():
    import torch

    from lens.metrics import entropy_bits

    logp = torch.log_softmax(torch.randn(3, 5, 97, dtype=torch.float64), dim=-1)
    logp[0, 0, :7] = -torch.inf
    scratch = torch.empty(2 * logp.numel(), dtype=torch.float64)
    for _ in range(2):  # a second use sees the first one's leftovers
        assert torch.equal(entropy_bits(logp, scratch=scratch), entropy_bits(logp))


def test_entropy_with_scratch_accepts_a_tensor_that_needs_grad():
    import torch

    from lens.metrics import entropy_bits

    logp = torch.log_softmax(torch.randn(2, 9, requires_grad=True), dim=-1)
    scratch = torch.empty(logp.numel())
    assert torch.equal(entropy_bits(logp, scratch=scratch), entropy_bits(logp))
