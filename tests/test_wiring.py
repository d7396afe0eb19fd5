"""``lens.wiring``: block shapes read off a forward pass, and the norm each layer gets."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lens.errors import LensError
from lens.wiring import observe

D, N, VOCAB = 8, 3, 11


class _Sub(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        return self.lin(x)


class Block(nn.Module):
    """One block in each of the shapes lens reads."""

    def __init__(self, shape: str) -> None:
        super().__init__()
        self.shape = shape
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn, self.mlp = _Sub(), _Sub()

    def forward(self, x):
        if self.shape == "post_norm":  # original transformer / OPT-350m
            x = self.ln1(x + self.attn(x))
            return self.ln2(x + self.mlp(x))
        if self.shape == "sublayer_norm":  # OLMo-2: norms on the sublayer outputs
            x = x + self.ln1(self.attn(x))
            return x + self.ln2(self.mlp(x))
        x = x + self.attn(self.ln1(x))  # GPT-2 / Llama
        return x + self.mlp(self.ln2(x))


class ToyLM(nn.Module):
    def __init__(self, shape: str, *, final_norm: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(Block(shape) for _ in range(N))
        self.norm = nn.LayerNorm(D) if final_norm else None
        self.lm_head = nn.Linear(D, VOCAB, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x)
        if self.norm is not None:
            x = self.norm(x)
        return SimpleNamespace(logits=self.lm_head(x))


IDS = torch.tensor([[1, 2, 3]])


@pytest.mark.parametrize("shape,final", [("pre_norm", True), ("post_norm", False),
                                         ("sublayer_norm", True)])
def test_shape_is_read_off_the_forward(shape, final):
    model = ToyLM(shape, final_norm=final)
    wiring = observe(model, IDS, n_layers=N).wiring
    assert wiring.architecture == shape
    assert wiring.final_norm is (model.norm if final else None)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_norm_for_each_layer_follows_spec_section_2():
    pre = ToyLM("pre_norm")
    w = observe(pre, IDS, n_layers=N).wiring
    assert [w.norm_for_layer(i) for i in range(N + 1)] == [
        pre.layers[0].ln1, pre.layers[1].ln1, pre.layers[2].ln1, pre.norm]
    post = ToyLM("post_norm", final_norm=False)
    w = observe(post, IDS, n_layers=N).wiring
    assert [w.norm_for_layer(i) for i in range(N + 1)] == [
        post.layers[0].ln1, *(b.ln2 for b in post.layers)]
    sub = ToyLM("sublayer_norm")
    w = observe(sub, IDS, n_layers=N).wiring
    assert all(w.norm_for_layer(i) is sub.norm for i in range(N + 1))


@pytest.mark.parametrize("layer", [-1, N + 1, 100])
def test_norm_for_layer_out_of_range(layer):
    with pytest.raises(ValueError):
        observe(ToyLM("pre_norm"), IDS, n_layers=N).wiring.norm_for_layer(layer)


@pytest.mark.parametrize("shape", ["pre_norm", "post_norm", "sublayer_norm"])
def test_taps_capture_what_each_block_hands_on(shape):
    """Layer 0 = block 0's input; post-norm layers are the sums the closing norm reads."""
    model = ToyLM(shape, final_norm=shape != "post_norm")
    wiring = observe(model, IDS, n_layers=N).wiring
    with torch.no_grad(), wiring.tap_residuals() as taps:
        model(IDS)
    x = model.embed(IDS)
    torch.testing.assert_close(taps[0], x)
    with torch.no_grad():
        for i, block in enumerate(model.layers):
            out = block(x)
            expected = out if shape != "post_norm" else None
            if shape == "post_norm":
                h = block.ln1(x + block.attn(x))
                expected = h + block.mlp(h)
                torch.testing.assert_close(block.ln2(taps[i + 1]), out)
            torch.testing.assert_close(taps[i + 1], expected)
            x = out
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_unreadable_block_shape_is_refused():
    model = ToyLM("sublayer_norm", final_norm=False)
    with pytest.raises(LensError, match="cannot tell how this model normalises"):
        observe(model, IDS, n_layers=N)


def test_pre_norm_without_final_norm_is_refused():
    model = ToyLM("pre_norm", final_norm=False)
    with pytest.raises(LensError, match="final norm"):
        observe(model, IDS, n_layers=N)
