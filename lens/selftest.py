"""``--self-test``: check the normalisation against the model itself; writes nothing.

Four checks, each with its own verdict:

1. *last-layer lens vs head*: the norm lens at the last layer must reproduce
   the model's own output distribution (KL to the head over every position).
2. *norm maths vs modules*: each layer's ``NormSpec`` gives the same output
   as the model's norm module on random inputs.
3. *learned norm scale*: each γ is finite and not all ~0, and on the model's
   real residuals the spec's output has the module's own per-position RMS
   (a wrong γ, ε or norm kind shows up as a scale mismatch).
4. *layer 0 input*: the layer-0 residual the lens decodes (embedding, plus
   additive positions when the model has them) is the model's own first hidden
   state (``output_hidden_states``), read independently of lens's hooks.

Every check is required of every block shape (pre-norm, post-norm,
sublayer-norm): the norm modules come from the model's wiring
(``LoadedModel.norm_module``), the specs from ``LoadedModel.norms``, so a
mis-wired norm fails checks 1–3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lens import metrics
from lens.config import RunConfig, default_probe
from lens.model import LoadedModel, capture, tokenize
from lens.norms import unwrap
from lens.precision import model_precision
from lens.report import build_analysis
from lens.unembed import analysis_dtype


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def _norm_modules(model: LoadedModel) -> list[torch.nn.Module]:
    return [unwrap(model.norm_module(layer)) for layer in range(model.n_layers + 1)]


def _tolerance(model: LoadedModel) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-5}.get(model.dtype, 2e-2)


def _rms(x: Tensor) -> Tensor:
    return x.double().pow(2).mean(dim=-1).sqrt()


def self_test(model: LoadedModel, config: RunConfig) -> list[Check]:
    """Run the four checks on ``model`` (see the module docstring)."""
    analysis = build_analysis(model, config)
    ids = tokenize(model, default_probe().facts[0].prompt)
    cap = capture(model, ids)
    modules = _norm_modules(model)
    dtype = analysis_dtype(model.dtype)
    tol = _tolerance(model)

    lens_logp = torch.log_softmax(analysis.lens.forward(cap.resids[-1], model.n_layers).to(dtype), -1)
    head_logp = torch.log_softmax(cap.head_logits.to(dtype), -1)
    kl = float(metrics.kl_bits(lens_logp, head_logp).max())
    limit = 1e-6 if dtype == torch.float64 else (1e-3 if model.dtype == torch.float32 else 0.05)
    checks = [Check("last-layer lens reproduces the head", kl <= limit,
                    f"max KL {kl:.3g} bits over {len(ids)} positions (limit {limit:g})")]

    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    for spec, module in zip(model.norms, modules, strict=True):
        x = torch.randn(3, model.d_model, generator=gen, dtype=torch.float64).to(
            device=model.device, dtype=model.dtype)
        with torch.no_grad():
            worst = max(worst, float((spec(x) - module(x).to(x.device)).abs().max()))
    norm_tol = 1e-5 if model.dtype in (torch.float32, torch.float64) else 5e-2
    checks.append(Check("norm maths matches the model's norm modules", worst <= norm_tol,
                        f"max abs difference {worst:.3g} on random inputs (limit {norm_tol:g})"))

    bad_gamma = [layer for layer, spec in enumerate(model.norms) if spec.weight is not None and (
        not bool(torch.isfinite(spec.weight).all())
        or float((spec.weight.double() + spec.weight_offset).abs().max()) < 1e-6)]
    errors = []
    for layer, (spec, module) in enumerate(zip(model.norms, modules, strict=True)):
        x = cap.resids[layer]
        with torch.no_grad(), model_precision(model.dtype):
            ours, theirs = _rms(spec(x)), _rms(module(x.to(_device_of(module, x))).to(x.device))
        err = float(((ours - theirs).abs() / theirs.clamp_min(1e-30)).max())
        errors.append((math.inf if math.isnan(err) else err, layer))
    worst_rms, worst_layer = max(errors)
    scale_ok = not bad_gamma and worst_rms <= tol
    detail = (f"γ non-finite or ~0 at layers {bad_gamma}; " if bad_gamma else "") + (
        f"max relative RMS difference {worst_rms:.3g} on the model's residuals "
        f"(layer {worst_layer}, limit {tol:g})")
    checks.append(Check("learned norm scale is consistent", scale_ok, detail))

    with torch.no_grad(), model_precision(model.dtype):
        hidden = model.hf_model(input_ids=torch.tensor([ids], device=model.device),
                                output_hidden_states=True).hidden_states
    block_in = hidden[0][0].to(cap.resids.device)
    diff = float(((cap.resids[0] - block_in).abs().max() / _rms(block_in).max().clamp_min(1e-30)))
    layer0 = "embedding + positions" if model.additive_positions else "token embedding only"
    checks.append(Check("layer 0 is block 0's input", diff <= tol,
                        f"{layer0}: max difference {diff:.3g} relative to its RMS (limit {tol:g})"))
    return checks


def _device_of(module: torch.nn.Module, fallback: Tensor) -> torch.device:
    param = next(iter(module.parameters()), None)
    return param.device if param is not None else fallback.device
