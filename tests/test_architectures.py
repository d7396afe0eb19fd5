"""Architecture conformance: every family decodes exactly as its own head, proven per check.

One test per (family, check), ids like ``test_architecture[gemma2-last_layer_kl]``.
The fixtures (``tests/models/arch/``, made by ``make_arch_models.py``) have
randomised norms and sharp heads, so a wrong norm, a missed head transform or a
residual read at the wrong place shows. References are computed with plain
``transformers`` (``output_hidden_states``, the model's own norm modules named
per family below), never with lens code.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import operator
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from lens.config import RunConfig, default_probe
from lens.lenses import LogitLens, RawLens
from lens.metrics import kl_bits
from lens.model import LoadedModel, capture, load_model, tokenize
from lens.precision import model_precision
from lens.report import build_analysis
from lens.selftest import self_test
from lens.testing import MODELS

ARCH = MODELS / "arch"
PROMPT = default_probe().facts[0].prompt


@dataclass(frozen=True)
class Family:
    """How the Hugging Face model of a family is built, written out by hand."""

    layers: str
    """Attribute path of the blocks."""
    ln1: str
    """Each block's input norm (post-norm: the first norm it calls)."""
    final: str | None
    """The final norm; None for a post-norm model (its blocks end in a norm)."""
    shape: str = "pre_norm"
    closing: str | None = None
    """Post-norm: the norm that ends each block."""
    head: Callable[[torch.Tensor, object], torch.Tensor] = lambda z, _config: z
    """The model's forward after ``lm_head`` (from its modelling code)."""


LLAMA = Family("model.layers", "input_layernorm", "model.norm")
FAMILIES = {
    "llama3": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA, "gemma": LLAMA,
    "phi3": LLAMA,
    "gemma2": dataclasses.replace(LLAMA, head=lambda z, c: torch.tanh(
        z / c.final_logit_softcapping) * c.final_logit_softcapping),
    "cohere": dataclasses.replace(LLAMA, head=lambda z, c: z * c.logit_scale),
    "granite": dataclasses.replace(LLAMA, head=lambda z, c: z / c.logits_scaling),
    "olmo2": dataclasses.replace(LLAMA, shape="sublayer_norm"),
    "gpt2": Family("transformer.h", "ln_1", "transformer.ln_f"),
    "gpt_neox": Family("gpt_neox.layers", "input_layernorm", "gpt_neox.final_layer_norm"),
    "opt": Family("model.decoder.layers", "self_attn_layer_norm", "model.decoder.final_layer_norm"),
    "opt_postnorm": Family("model.decoder.layers", "self_attn_layer_norm", None,
                           shape="post_norm", closing="final_layer_norm"),
}
CHECKS = ("last_layer_kl", "self_test", "norm_lens_reference", "logit_lens_reference",
          "raw_lens_reference", "end_to_end", "miswired_norm_fails", "miswired_layer0_fails")


@pytest.fixture(scope="module")
def arch_models() -> dict[str, LoadedModel]:
    """Each fixture loaded once per module, lazily (float64, CPU; read-only)."""
    cache: dict[str, LoadedModel] = {}

    class Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, name: str) -> LoadedModel:
            cache[name] = load_model(str(ARCH / name), device="cpu", dtype="float64")
            self[name] = cache[name]
            return cache[name]

    return Lazy()


def _streams(model: LoadedModel, family: Family,
             ids: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Plain transformers: the stream each layer's norm reads, and the model's own logits.

    Layers 0..n-1 are the inputs of blocks 0..n-1 (``output_hidden_states``); a
    post-norm block's stream is what its closing norm reads (a torch pre-hook on
    that named module). The last layer's reference is the model's output itself.
    """
    hf = model.hf_model
    blocks = operator.attrgetter(family.layers)(hf)
    sums: dict[int, torch.Tensor] = {}
    handles = []
    if family.closing is not None:
        for i, block in enumerate(blocks):
            handles.append(operator.attrgetter(family.closing)(block).register_forward_pre_hook(
                lambda _m, args, i=i: sums.__setitem__(i + 1, args[0])))
    try:
        with torch.no_grad(), model_precision(torch.float64):  # HF's float32 islands in float64
            out = hf(input_ids=torch.tensor([ids]), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    hidden = [h[0] for h in out.hidden_states]
    assert len(hidden) == model.n_layers + 1
    streams = [hidden[0]] + [sums[i][0] if sums else hidden[i] for i in range(1, model.n_layers)]
    return streams, out.logits[0]


def _unembed(model: LoadedModel, family: Family, h: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return family.head(model.hf_model.get_output_embeddings()(h), model.hf_config)


def _norm(model: LoadedModel, family: Family, layer: int) -> torch.nn.Module:
    """The module docs/outputs.md names for ``layer``, from the family's own attribute names."""
    hf, n = model.hf_model, model.n_layers
    blocks = operator.attrgetter(family.layers)(hf)
    if family.shape == "sublayer_norm":
        return operator.attrgetter(family.final)(hf)
    if layer == 0:
        return operator.attrgetter(family.ln1)(blocks[0])
    if family.shape == "post_norm":
        return operator.attrgetter(family.closing)(blocks[layer - 1])
    return operator.attrgetter(family.ln1)(blocks[layer]) if layer < n else \
        operator.attrgetter(family.final)(hf)


def _final_norm(model: LoadedModel, family: Family) -> torch.nn.Module:
    if family.final is None:  # post-norm: the last block's closing norm feeds the head
        return _norm(model, family, model.n_layers)
    return operator.attrgetter(family.final)(model.hf_model)


def _close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    torch.testing.assert_close(ours, reference.to(ours.dtype), rtol=1e-9, atol=1e-9)


def _last_layer_kl(model: LoadedModel, family: Family) -> None:
    ids = tokenize(model, PROMPT)
    cap = capture(model, ids)
    lens = build_analysis(model, RunConfig(dtype="float64")).lens
    logp = torch.log_softmax(lens.forward(cap.resids[-1], model.n_layers), -1)
    head = torch.log_softmax(cap.head_logits, -1)
    assert float(kl_bits(logp, head).max()) < 1e-6
    assert float(head.exp().max()) > 0.05, "the fixture's head is too flat to catch mistakes"


def _self_test(model: LoadedModel, family: Family) -> None:
    checks = self_test(model, RunConfig(dtype="float64"))
    assert len(checks) == 4 and all(c.ok for c in checks), [(c.name, c.detail) for c in checks]


def _norm_lens_reference(model: LoadedModel, family: Family) -> None:
    ids = tokenize(model, PROMPT)
    streams, head = _streams(model, family, ids)
    lens = build_analysis(model, RunConfig(dtype="float64")).lens
    resids = capture(model, ids).resids
    for layer, stream in enumerate(streams):
        with torch.no_grad(), model_precision(torch.float64):
            reference = _unembed(model, family, _norm(model, family, layer)(stream))
        _close(lens.forward(resids[layer], layer), reference)
    _close(lens.forward(resids[-1], model.n_layers), head)
    assert model.architecture == family.shape


def logit_lens(model: LoadedModel) -> LogitLens:
    """The registry's logit lens (the model's final norm at every layer), as a run builds it."""
    unembed = build_analysis(model, RunConfig(dtype="float64")).lens.unembed
    return LogitLens(unembed, model.norms[-1])


def _logit_lens_reference(model: LoadedModel, family: Family) -> None:
    ids = tokenize(model, PROMPT)
    streams, head = _streams(model, family, ids)
    lens, resids = logit_lens(model), capture(model, ids).resids
    final = _final_norm(model, family)
    for layer, stream in enumerate(streams):
        with torch.no_grad(), model_precision(torch.float64):
            reference = _unembed(model, family, final(stream))
        _close(lens.forward(resids[layer], layer), reference)
    _close(lens.forward(resids[-1], model.n_layers), head)


def _raw_lens_reference(model: LoadedModel, family: Family) -> None:
    ids = tokenize(model, PROMPT)
    streams, _ = _streams(model, family, ids)
    raw = RawLens(build_analysis(model, RunConfig(dtype="float64")).lens.unembed)
    norm = build_analysis(model, RunConfig(dtype="float64")).lens
    resids = capture(model, ids).resids
    differs = False
    for layer, stream in enumerate(streams):
        _close(raw.forward(resids[layer], layer), _unembed(model, family, stream))
        differs |= not torch.allclose(raw.forward(resids[layer], layer),
                                      norm.forward(resids[layer], layer))
    assert differs, "raw and norm lens agree everywhere: the norms would be invisible"


def _end_to_end(model: LoadedModel, family: Family, run_lens: Callable[..., tuple]) -> None:
    name = model.name
    status, files, err = run_lens(str(ARCH / name), "--dtype", "float64", "--device", "cpu")
    assert status == 0, err
    report = json.loads(files[f"output-{name}.json"])
    diagnostics = report["diagnostics"]
    consistency = diagnostics["last_layer_consistency"]
    assert consistency["kl_to_final_bits"] < 1e-6
    assert consistency["cfg_transform"] == model.head.as_json()
    assert diagnostics["gold_alignment"] == "ok"
    assert report["gold_answer"]["first_id"] is not None
    assert model.tokenizer.decode([report["gold_answer"]["first_id"]]).strip() == "Berlin"
    raw = report["raw_lens_check"]
    assert raw["samples"] and raw["summary"]["max_kl_norm_vs_raw_bits"] > 0
    expected = {"pre_norm": "using_next_ln1_then_ln_final", "post_norm": "using_same_block_ln2",
                "sublayer_norm": "using_ln_final_no_pre_norm_in_blocks"}[family.shape]
    assert diagnostics["norm_alignment_fix"] == expected
    rows = list(csv.reader(io.StringIO(files[f"output-{name}-pure-next-token.csv"].decode(),
                                       newline="")))
    assert len(rows) == 1 + 3 * (model.n_layers + 1)  # header, then 3 passes × (n + 1) layers


def _miswired_norm_fails(model: LoadedModel, family: Family) -> None:
    """A mis-wired norm (γ × 1.5, β shifted) fails every norm check, whatever the shape."""
    def broken(spec):  # type: ignore[no-untyped-def]
        bias = None if spec.bias is None else spec.bias + 0.5
        return dataclasses.replace(spec, weight=spec.weight * 1.5, bias=bias)

    verdicts = {c.name: c.ok for c in self_test(
        dataclasses.replace(model, norms=tuple(broken(s) for s in model.norms)),
        RunConfig(dtype="float64"))}
    assert list(verdicts.values()) == [False, False, False, True], verdicts


def _miswired_layer0_fails(model: LoadedModel, family: Family) -> None:
    """Layer 0 read at the wrong place (block 1's input) fails the layer-0 check."""
    blocks = model.wiring.blocks
    wiring = dataclasses.replace(model.wiring, blocks=(blocks[1], *blocks[1:]))
    checks = self_test(dataclasses.replace(model, wiring=wiring), RunConfig(dtype="float64"))
    assert [c.ok for c in checks][-1] is False, [(c.name, c.detail) for c in checks]


@pytest.mark.parametrize("family,check", [(f, c) for f in FAMILIES for c in CHECKS],
                         ids=[f"{f}-{c}" for f in FAMILIES for c in CHECKS])
def test_architecture(family, check, arch_models, request):
    model = arch_models[family]
    if check == "end_to_end":
        _end_to_end(model, FAMILIES[family], request.getfixturevalue("run_lens"))
        return
    globals()[f"_{check}"](model, FAMILIES[family])


def test_gemma2_head_is_softcapped(arch_models):
    """The soft-cap is detected from Hugging Face's own key and reported in ``cfg_transform``."""
    model = arch_models["gemma2"]
    assert model.head.as_json() == {"scale": None, "softcap": 15.0,
                                    "applied": [["softcap", 15.0, "final_logit_softcapping"]]}


CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@CUDA[0]
@CUDA[1]
def test_architecture_cuda(family, dtype, arch_models):
    """On CUDA the head still matches (fp32: every check; bf16: the last layer, at its limit),
    and the norm lens agrees with the float64 CPU lens at every layer."""
    model = load_model(str(ARCH / family), device="cuda", dtype=dtype)
    checks = self_test(model, RunConfig(dtype=dtype))
    required = checks if dtype == "float32" else checks[:1]
    assert all(c.ok for c in required), [(c.name, c.detail) for c in checks]
    cpu = arch_models[family]
    ids = tokenize(model, PROMPT)
    ours = build_analysis(model, RunConfig(dtype=dtype)).lens
    ref = build_analysis(cpu, RunConfig(dtype="float64")).lens
    resids, ref_resids = capture(model, ids).resids, capture(cpu, ids).resids
    limit = 1e-3 if dtype == "float32" else 0.1
    for layer in range(model.n_layers + 1):
        p = torch.log_softmax(ours.forward(resids[layer], layer).double().cpu(), -1)
        q = torch.log_softmax(ref.forward(ref_resids[layer], layer), -1)
        assert float(kl_bits(p, q).max()) < limit, (layer, float(kl_bits(p, q).max()))
