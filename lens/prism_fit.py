"""``python -m lens.prism_fit [MODEL …]``: fit the Prism lens's artifacts (README, Prism).

For each model: run the prompt set, normalise the residuals at post-block
depths ≈ 25/50/75 % with the model's own norms, and stream every position
(except a prepended BOS, whose residual is the same vector in every prompt)
into running moments and a seeded reservoir. Then whitening, the sample's
principal axes, the unembedding's singular vectors and the Procrustes map
``Q``; ``k`` is lowered to what the sample and ``W_U`` support. Every fifth
prompt is held out: the fit reports the mean KL(P_lens ‖ P_final) over their
positions per sampled depth, for the norm lens, the logit lens and the Prism
lens, on screen and in ``provenance.json``, with the verdict: whether Prism
beats the logit lens (``--prism auto`` does not use a set that does not). A
model that cannot be fitted (e.g. non-finite activations) is one error line,
and the next model is fitted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.metadata
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from lens import metrics
from lens.artifacts import ModelFacts, verdict
from lens.cli import OneLineParser, add_config_flags
from lens.config import SEED
from lens.diagnostic_emitters import depth_layers
from lens.errors import LensError, first_line
from lens.lenses import Lens, LogitLens, NormLens
from lens.model import Capture, LoadedModel, capture_batch, tokenize
from lens.prism import DEFAULT_DIR, EPS, PrismArtifacts, PrismLens
from lens.prism_maths import (
    Reservoir,
    RunningMoments,
    orthogonality_error,
    principal_axes,
    procrustes,
    unembedding_basis,
    whiten,
)
from lens.progress import Progress
from lens.unembed import Unembed, analysis_dtype, unembed_dtype

PROG = "python -m lens.prism_fit"
BUILTIN_PROMPTS = "probes/prism_prompts.txt"
HELD_OUT_EVERY = 5
K_DEFAULT = 512
RESERVOIR_DEFAULT = 20000
FORMAT_VERSION = 2
BATCH_TOKENS = 1024
"""Prompts run together, right-padded, up to this many padded tokens per forward."""
ARTIFACT_DTYPE = torch.float32
"""Artifacts are stored in float32 whatever the model's dtype. Float32 is all the
lens needs (README, Prism: fp32 statistics, fp32 W_U), and it makes a float64 fit
bit-identical across CPU kernels: PCA amplifies the fit's last-bit kernel noise
(~1e-16) to ~1e-14, still far below float32 resolution (6e-8)."""


def build_parser() -> argparse.ArgumentParser:
    from lens.embedded import EMBEDDED_ID

    p = OneLineParser(prog=PROG,
                      description="Fit the Prism lens (whitening + orthogonal map) of models.")
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help=f"hub id, local Hugging Face directory, or {EMBEDDED_ID} (default)")
    p.add_argument("--prompts-file", type=Path, default=None,
                   help="one prompt per line ('#' comments and blank lines skipped); "
                        "default: the built-in set of short factual prompts")
    p.add_argument("--prism-dir", type=Path, default=None,
                   help="artifacts go to <prism-dir>/<name>/ (default prisms/)")
    p.add_argument("--k", type=int, default=K_DEFAULT,
                   help=f"dimensions to align (default {K_DEFAULT}; lowered to what the sample "
                        "supports)")
    p.add_argument("--reservoir", type=int, default=RESERVOIR_DEFAULT,
                   help=f"rows kept for the principal axes (default {RESERVOIR_DEFAULT})")
    p.add_argument("--seed", type=int, default=SEED, help=f"reservoir seed (default {SEED})")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    add_config_flags(p, only=("device", "dtype"))
    return p


def read_prompts(path: Path | None) -> tuple[list[str], str]:
    """The prompts and where they came from; one per line, '#' comments skipped."""
    if path is None:
        text = resources.files("lens").joinpath(BUILTIN_PROMPTS).read_text(encoding="utf-8")
        source = "built-in"
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise LensError(f"--prompts-file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise LensError(f"cannot read --prompts-file {path}: {exc}") from None
        source = str(path)
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if len(prompts) < HELD_OUT_EVERY:
        raise LensError(f"{source} prompts: need at least {HELD_OUT_EVERY} prompts "
                        f"(every {HELD_OUT_EVERY}th is held out), got {len(prompts)}")
    return prompts, source


def split_prompts(prompts: Sequence[str]) -> tuple[list[str], list[str]]:
    """(fit, held-out): every ``HELD_OUT_EVERY``-th prompt (5th, 10th, …) is held out."""
    held = [p for i, p in enumerate(prompts) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    fit = [p for i, p in enumerate(prompts) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return fit, held


def captures(model: LoadedModel, prompts: Sequence[str]) -> Iterator[tuple[list[int], Capture]]:
    """(ids, capture) per prompt, in order; consecutive prompts share a padded forward."""
    pending: list[list[int]] = []
    for prompt in prompts:
        ids = tokenize(model, prompt)
        width = max([len(ids), *(len(p) for p in pending)])
        if pending and width * (len(pending) + 1) > BATCH_TOKENS:
            yield from zip(pending, capture_batch(model, pending), strict=True)
            pending = []
        pending.append(ids)
    yield from zip(pending, capture_batch(model, pending), strict=True)


def _positions(model: LoadedModel, ids: list[int]) -> slice:
    """Every position but a leading BOS (identical in every prompt, so one vector at most)."""
    bos = model.tokenizer.bos_token_id
    return slice(1 if bos is not None and ids[0] == bos and len(ids) > 1 else 0, None)


@dataclass
class Sample:
    moments: RunningMoments
    reservoir: Reservoir
    per_layer: dict[int, int]
    tokens: int


def collect(model: LoadedModel, prompts: Sequence[str], layers: Sequence[int], *,
            reservoir: int, seed: int, progress: Progress) -> Sample:
    """Stream the normalised residuals of every position at ``layers`` into moments + reservoir."""
    stats_dtype = torch.promote_types(model.dtype, torch.float32)
    moments = RunningMoments(model.d_model, dtype=stats_dtype)
    res = Reservoir(reservoir, seed=seed, dtype=stats_dtype)
    per_layer = dict.fromkeys(layers, 0)
    tokens = 0
    for i, (ids, cap) in enumerate(captures(model, prompts)):
        progress.show(f"prism_fit: {model.name}: collecting {i + 1}/{len(prompts)} prompts, "
                      f"{sum(per_layer.values())} vectors")
        keep = _positions(model, ids)
        tokens += len(ids[keep])
        for layer in layers:
            x = model.norms[layer](cap.resids[layer, keep])
            if not bool(torch.isfinite(x).all()):
                raise LensError(f"{model.name}: non-finite normalised residuals at layer {layer} "
                                f"in fit prompt {i + 1}; Prism cannot be fitted on this model")
            moments.update(x)
            res.add(x)
            per_layer[layer] += int(x.shape[0])
    return Sample(moments, res, per_layer, tokens)


def choose_k(requested: int, *, d_model: int, distinct: int,
             rank_wu: int) -> tuple[int, str | None]:
    """k = min(requested, d_model, distinct − 1, rank W_U), and why it was lowered (or None)."""
    limits = {"d_model": d_model, "distinct fit vectors - 1": distinct - 1, "rank of W_U": rank_wu}
    k = min(requested, *limits.values())
    if k >= requested:
        return k, None
    binding = [f"{name} is {value}" for name, value in limits.items() if value == k]
    return k, f"the sample supports at most {k}: {', '.join(binding)}"


def held_out_kl(model: LoadedModel, prompts: Sequence[str], layers: Sequence[int],
                lenses: Sequence[Lens], progress: Progress) -> list[dict[str, Any]]:
    """Mean KL(P_lens ‖ P_final) in bits over every held-out position, per layer and lens."""
    dtype = analysis_dtype(model.dtype)
    sums: dict[tuple[int, str], list[float]] = {
        (L, lens.name): [] for L in layers for lens in lenses}
    count = 0
    for i, (ids, cap) in enumerate(captures(model, prompts)):
        progress.show(f"prism_fit: {model.name}: held-out KL {i + 1}/{len(prompts)} prompts")
        keep = _positions(model, ids)
        final = torch.log_softmax(cap.head_logits[keep].to(dtype), dim=-1)
        count += int(final.shape[0])
        for layer in layers:
            for lens in lenses:
                logp = metrics.log_probs(lens.forward(cap.resids[layer, keep], layer), dtype)
                sums[(layer, lens.name)].extend(metrics.kl_bits(logp, final).tolist())
    def mean(layer: int, lens: Lens) -> float:
        return metrics.settle(math.fsum(sums[(layer, lens.name)]) / count)

    return [{"layer": L, "positions": count, **{lens.name: mean(L, lens) for lens in lenses}}
            for L in layers]


def _versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for dist in ("lens", "torch", "transformers", "transformer-lens"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "unknown"
    return versions


@dataclass(frozen=True, eq=False)
class FitResult:
    artifacts: PrismArtifacts
    messages: tuple[str, ...]


def fit(model: LoadedModel, prompts: Sequence[str], *, source: str, k_requested: int = K_DEFAULT,
        reservoir: int = RESERVOIR_DEFAULT, seed: int = SEED,
        progress: Progress | None = None) -> FitResult:
    """Fit whitening and ``Q`` for ``model``; deterministic for a model, prompts and seed."""
    if k_requested < 1:
        raise LensError(f"--k must be at least 1, got {k_requested}")
    if reservoir < 2:
        raise LensError(f"--reservoir must be at least 2, got {reservoir}")
    progress = progress or Progress()
    layers = depth_layers(model.n_layers)
    fit_prompts, held = split_prompts(prompts)
    clock = time.perf_counter()
    sample = collect(model, fit_prompts, layers, reservoir=reservoir, seed=seed, progress=progress)
    seconds = {"collect": time.perf_counter() - clock}
    clock = time.perf_counter()
    stats_dtype = sample.moments.mean.dtype
    mean, var = sample.moments.mean, sample.moments.var
    kept = sample.reservoir.sample()
    distinct = int(torch.unique(kept, dim=0).shape[0])
    U, rank_wu = unembedding_basis(model.W_U)
    k, reason = choose_k(k_requested, d_model=model.d_model, distinct=distinct, rank_wu=rank_wu)
    if k < 1:
        raise LensError(f"{model.name}: only {distinct} distinct residual vectors were sampled; "
                        "give more (or longer) prompts")
    E_k = principal_axes(whiten(kept.to(torch.float64), mean.double(), var.double(), EPS), k)
    Q, reorthonormalised = procrustes(E_k, U[:, :k])
    seconds["basis"] = time.perf_counter() - clock
    messages = [] if reason is None else [f"k lowered from {k_requested} to {k}: {reason}"]
    if reorthonormalised:
        messages.append("Q re-orthonormalised by QR (‖QᵀQ − I‖ > 1e-3 after Procrustes)")
    provenance: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model": ModelFacts.of(model).as_json(),
        "model_id": model.model_id,
        "name": model.name,
        "d_model": model.d_model,
        "n_layers": model.n_layers,
        "d_vocab": model.d_vocab,
        "dtype": str(model.dtype).removeprefix("torch."),
        "stats_dtype": str(stats_dtype).removeprefix("torch."),
        "artifact_dtype": str(ARTIFACT_DTYPE).removeprefix("torch."),
        "layers": list(layers),
        "k": k,
        "k_requested": k_requested,
        "k_lowered_reason": reason,
        "rank_W_U": rank_wu,
        "eps": EPS,
        "positions": "every position except a prepended BOS",
        "sample_counts": {
            "fit_prompts": len(fit_prompts), "held_out_prompts": len(held),
            "fit_tokens": sample.tokens,
            "vectors_per_layer": {str(L): n for L, n in sample.per_layer.items()},
            "vectors_total": sample.moments.count,
            "reservoir_capacity": reservoir, "reservoir_kept": int(kept.shape[0]),
            "distinct_vectors": distinct,
        },
        "seed": seed,
        "q_orthogonality_error": None,
        "q_reorthonormalised": reorthonormalised,
        "prompts": {"source": source, "count": len(prompts),
                    "sha256": hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest(),
                    "held_out_every": HELD_OUT_EVERY, "fit": list(fit_prompts),
                    "held_out": list(held)},
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": _versions(),
    }
    artifacts = PrismArtifacts(mean=mean.to(ARTIFACT_DTYPE), var=var.to(ARTIFACT_DTYPE), eps=EPS,
                               Q=Q.to(ARTIFACT_DTYPE), provenance=provenance)
    provenance["q_orthogonality_error"] = orthogonality_error(artifacts.Q)
    unembed = Unembed(model.W_U, model.b_U, head=model.head,
                      dtype=unembed_dtype(model.dtype, fp32_unembed=False))
    lenses = (NormLens(unembed, model.norms), LogitLens(unembed, model.norms[-1]),
              PrismLens(unembed, model.norms, artifacts))
    clock = time.perf_counter()
    provenance["held_out_kl_bits"] = held_out_kl(model, held, layers, lenses, progress)
    provenance["verdict"] = verdict(provenance["held_out_kl_bits"], "prism")
    seconds["held_out"] = time.perf_counter() - clock
    provenance["seconds"] = {key: round(value, 1) for key, value in seconds.items()}
    progress.clear()
    return FitResult(artifacts, tuple(messages))


def kl_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The held-out KL table as text lines."""
    names = ("norm", "logit", "prism")
    lines = [f"{'layer':>7}" + "".join(f" {n:>10}" for n in names)]
    lines += [f"{r['layer']:>7}" + "".join(f" {r[n]:>10.4f}" for n in names) for r in rows]
    return lines


def fit_model(model_id: str, prompts: Sequence[str], source: str, args: argparse.Namespace) -> None:
    from lens.model import load_model

    start = time.perf_counter()
    model = load_model(model_id, device=args.device, dtype=args.dtype)
    result = fit(model, prompts, source=source, k_requested=args.k, reservoir=args.reservoir,
                 seed=args.seed, progress=Progress(quiet=args.quiet))
    directory = (args.prism_dir or DEFAULT_DIR) / model.name
    try:
        result.artifacts.save(directory)
    except OSError as exc:
        raise LensError(f"cannot write Prism artifacts into {directory}: "
                        f"{exc.strerror or exc}") from exc
    if args.quiet:
        return
    p = result.artifacts.provenance
    counts = p["sample_counts"]
    say = lambda line: print(f"prism_fit: {model.name}: {line}")  # noqa: E731
    for message in result.messages:
        say(message)
    say(f"{counts['fit_prompts']} fit prompts, {counts['held_out_prompts']} held out; layers "
        f"{', '.join(map(str, p['layers']))}; {counts['vectors_total']} vectors "
        f"({counts['distinct_vectors']} distinct in the reservoir of {counts['reservoir_kept']}); "
        f"k = {p['k']}")
    rows = p["held_out_kl_bits"]
    say(f"held-out KL to the model's head, bits (mean over {rows[0]['positions']} positions):")
    for line in kl_table(rows):
        print(f"  {line}")
    v = p["verdict"]
    say(("Prism beats the logit lens: " if v["beats_logit_lens"] else
         "Prism does NOT beat the logit lens (--prism auto will not use it): ") + v["reason"])
    say(f"wrote {directory}/ ({time.perf_counter() - start:.1f}s)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns 0 when every model was fitted."""
    from lens.embedded import EMBEDDED_ID

    args = build_parser().parse_args(argv)
    try:
        prompts, source = read_prompts(args.prompts_file)
        if args.k < 1:
            raise LensError(f"--k must be at least 1, got {args.k}")
        if args.reservoir < 2:
            raise LensError(f"--reservoir must be at least 2, got {args.reservoir}")
        status = 0
        for model_id in list(args.models) or [EMBEDDED_ID]:
            try:
                fit_model(model_id, prompts, source, args)
            except LensError as exc:
                print(f"lens: error: {exc}", file=sys.stderr)
                status = 1
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the rest
                print(f"lens: error: {model_id}: cannot fit Prism: {first_line(exc)}",
                      file=sys.stderr)
                status = 1
        return status
    except LensError as exc:
        print(f"lens: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lens: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
