"""``--self-test``: check the normalisation against the model itself; writes nothing."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lens import metrics
from lens.config import RunConfig, default_probe
from lens.model import LoadedModel, capture, tokenize
from lens.norms import norm_for_layer, unwrap
from lens.report import build_analysis
from lens.unembed import analysis_dtype


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def self_test(model: LoadedModel, config: RunConfig) -> list[Check]:
    """The norm lens at the last layer must reproduce the head; norms must match their modules."""
    analysis = build_analysis(model, config)
    ids = tokenize(model, default_probe().facts[0].prompt)
    cap = capture(model, ids)
    dtype = analysis_dtype(model.dtype)
    lens_logp = torch.log_softmax(analysis.lens.forward(cap.resids[-1], model.n_layers).to(dtype), -1)
    head_logp = torch.log_softmax(cap.head_logits.to(dtype), -1)
    kl = float(metrics.kl_bits(lens_logp, head_logp).max())
    limit = 1e-6 if dtype == torch.float64 else (1e-3 if model.dtype == torch.float32 else 0.05)
    checks = [Check("last-layer lens reproduces the head",
                    model.architecture == "post_norm" or kl <= limit,
                    f"max KL {kl:.3g} bits over {len(ids)} positions (limit {limit:g})")]
    blocks = model.bridge.blocks
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    for layer, spec in enumerate(model.norms):
        module = unwrap(norm_for_layer(layer, architecture=model.architecture,
                                       ln1=[b.ln1 for b in blocks], ln2=[b.ln2 for b in blocks],
                                       ln_final=model.bridge.ln_final))
        x = torch.randn(3, model.d_model, generator=gen, dtype=torch.float64).to(
            device=model.device, dtype=model.dtype)
        with torch.no_grad():
            worst = max(worst, float((spec(x) - module(x)).abs().max()))
    tol = 1e-5 if model.dtype in (torch.float32, torch.float64) else 5e-2
    checks.append(Check("norm maths matches the model's norm modules", worst <= tol,
                        f"max abs difference {worst:.3g} (limit {tol:g})"))
    return checks
