"""Decode memory by construction: a chunk is a third of a pass at most, freed before the next."""

from __future__ import annotations

import math
import weakref

import pytest

from lens.config import RunConfig, default_probe
from lens.decode import decode_steps
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


@pytest.mark.parametrize("name", TINY_MODELS)
def test_a_chunk_holds_at_most_a_third_of_the_pass(tiny_models, name):
    resids, steps = _steps(tiny_models[name])
    n_layers, seq, _ = resids.shape
    full = n_layers * seq * tiny_models[name].d_vocab  # one pass's logits, in elements
    for step in steps:
        for tensor in (step.logits, step.logp):
            assert tensor._base is not None  # a view of its chunk, not a copy
            assert tensor._base.numel() <= math.ceil(n_layers / 3) * full // n_layers


def test_a_chunk_is_freed_before_the_next_is_decoded(tiny_models, monkeypatch):
    model = tiny_models["tiny-llama"]
    analysis = build_analysis(model, RunConfig(dtype="float64"))
    chunks: list[weakref.ref] = []
    alive_at_decode: list[bool] = []
    decode = analysis.lens.decode

    def spy(resids, layers):
        alive_at_decode.append(any(ref() is not None for ref in chunks))
        logits = decode(resids, layers)
        chunks.append(weakref.ref(logits))
        return logits

    monkeypatch.setattr(analysis.lens, "decode", spy)
    _, steps = _steps(model, analysis)
    for step in steps:  # the way Pass.run consumes steps
        assert step.logits._base is chunks[-1]()
        del step
    assert len(alive_at_decode) >= 2 and not any(alive_at_decode)


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
