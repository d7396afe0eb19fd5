"""First principles on the tiny models: the lens at the last layer is the model's head."""

from __future__ import annotations

import pytest
import torch

from lens import metrics
from lens.config import RunConfig, default_probe
from lens.decode import decode_steps
from lens.model import capture, tokenize
from lens.passes import passes_for
from lens.report import build_analysis
from lens.testing import TINY_MODELS

PROMPT = default_probe().facts[0].prompt


@pytest.mark.parametrize("name", TINY_MODELS)
def test_norm_lens_at_last_layer_reproduces_head(tiny_models, name):
    model = tiny_models[name]
    analysis = build_analysis(model, RunConfig(dtype="float64"))
    cap = capture(model, tokenize(model, PROMPT))
    lens_logp = torch.log_softmax(analysis.lens.forward(cap.resids[-1], model.n_layers), dim=-1)
    head_logp = torch.log_softmax(cap.head_logits, dim=-1)
    assert float(metrics.kl_bits(lens_logp, head_logp).max()) < 1e-6


@pytest.mark.parametrize("name", TINY_MODELS)
def test_raw_lens_differs_from_norm_lens(tiny_models, name):
    """A lens that skipped normalisation would pass the KL test only by accident."""
    model = tiny_models[name]
    analysis = build_analysis(model, RunConfig(dtype="float64"))
    cap = capture(model, tokenize(model, PROMPT))
    raw = torch.log_softmax(analysis.raw.forward(cap.resids[-1], model.n_layers), dim=-1)
    head = torch.log_softmax(cap.head_logits, dim=-1)
    assert float(metrics.kl_bits(raw, head).max()) > 1e-3


def test_architectures_and_norm_kinds(tiny_models):
    gpt2, llama = tiny_models["tiny-gpt2"], tiny_models["tiny-llama"]
    assert (gpt2.architecture, llama.architecture) == ("pre_norm", "pre_norm")
    assert {n.kind for n in gpt2.norms} == {"LayerNorm"}
    assert all(n.bias is not None for n in gpt2.norms)
    assert {n.kind for n in llama.norms} == {"RMSNorm"}
    assert gpt2.additive_positions and not llama.additive_positions


@pytest.mark.parametrize("name", TINY_MODELS)
def test_layer0_is_the_input_of_block0(tiny_models, name):
    """Layer 0 (embedding, + positions only when additive) is what block 0 actually reads."""
    model = tiny_models[name]
    ids = tokenize(model, PROMPT)
    cap = capture(model, ids)
    with torch.no_grad():
        hidden = model.hf_model(input_ids=torch.tensor([ids]),
                                output_hidden_states=True).hidden_states
    assert torch.allclose(cap.resids[0], hidden[0][0], atol=1e-12)


def test_steps_carry_the_copy_window(tiny_models):
    model = tiny_models["tiny-gpt2"]
    config = RunConfig(dtype="float64", copy_window_k=2)
    analysis = build_analysis(model, config)
    orig = passes_for(default_probe().facts[0])[0]
    ids = tokenize(model, PROMPT)
    cap = capture(model, ids)
    ctx = orig.context(analysis, cap, ids)
    steps = [s.kept() for s in decode_steps(ctx, analysis.lens, cap.resids)]
    top1 = [int(s.top_ids[-1, 0]) for s in steps]
    assert [s.window for s in steps] == [tuple(top1[max(0, i - 1):i + 1]) for i in range(len(top1))]


def test_layer_chunking_does_not_change_numbers(tiny_models, monkeypatch):
    import lens.decode as decode

    model = tiny_models["tiny-llama"]
    analysis = build_analysis(model, RunConfig(dtype="float64"))
    orig = passes_for(default_probe().facts[0])[0]
    ids = tokenize(model, PROMPT)
    cap = capture(model, ids)
    ctx = orig.context(analysis, cap, ids)
    # a step's tensors live in buffers reused by the next chunk: keep copies
    whole = [s.logp.clone() for s in decode_steps(ctx, analysis.lens, cap.resids)]
    monkeypatch.setattr(decode, "CHUNK_ELEMENTS", 1)
    chunked = [s.logp.clone() for s in decode_steps(ctx, analysis.lens, cap.resids)]
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12)
               for a, b in zip(whole, chunked, strict=True))
