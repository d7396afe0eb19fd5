"""``python -m lens.tuned_fit [MODEL …]``: fit a tuned lens (Belrose et al. 2023) per model.

**Training text.** It must exist on a machine without network, so it is text
every Python has: the built-in Prism prompt set (short factual English, the
kind of text lens probes) followed by the Python language reference that ships
with CPython (``pydoc_data.topics``: ~465 kB of English prose and code, its
topics in sorted order). ``--text-file`` replaces it. The text is tokenized
once and cut into windows of ``--window`` tokens (BOS first, as lens runs
prompts); every fifth window is held out and never trained on.

**Fit.** The residuals of every layer and the model's head are captured once,
without gradients, for every position of every window. Each layer's translator
``h ↦ h + h Aᵀ + b`` starts from the identity (A = 0, b = 0: the logit lens).
Its first step is closed-form: a weighted least-squares map of the layer's
residuals onto the last layer's, each position rescaled to its input's norm and
weighted by its inverse square (the final norm ignores scale, so every position
counts alike; a prepended BOS with a huge norm does not dominate). Then
``--steps`` Adam steps, all layers at once in one batched matmul, minimise
KL(model head ‖ lens) through the final norm and the unembedding over seeded
minibatches of training positions. float32 throughout, fixed seed.

**Report.** The held-out KL per layer, in bits, of the primary norm lens, the
logit lens and the tuned lens (``KL(P_lens ‖ P_head)``, as ``kl_to_final_bits``
in the CSVs; the training direction ``KL(P_head ‖ P_lens)`` is stored too),
on screen and in ``provenance.json`` with the verdict (does the tuned lens beat
the logit lens?), the model's facts and the settings. Every model's failure is
one error line, and the next model is fitted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lens.artifacts import ModelFacts, verdict
from lens.cli import OneLineParser
from lens.config import DEVICES, DTYPES, SEED
from lens.errors import LensError, first_line
from lens.lenses import Lens, LogitLens, NormLens
from lens.model import LoadedModel, capture_batch
from lens.tuned import DEFAULT_DIR, TunedArtifacts, TunedLens
from lens.unembed import Unembed

PROG = "python -m lens.tuned_fit"
FORMAT_VERSION = 1
HELD_OUT_EVERY = 5
WINDOW = 64
WINDOWS = 120
STEPS = 20
BATCH = 32
LR = 1e-4
CHECK_POSITIONS = 256
"""Fixed training positions on which each layer keeps Adam's result only if it lowered the KL."""
RIDGE = 1e-4
"""Ridge on the least-squares normal equations, relative to their mean diagonal."""
CAPTURE_BATCH = 8
EVAL_CHUNK = 128


def build_parser() -> argparse.ArgumentParser:
    from lens.embedded import EMBEDDED_ID

    p = OneLineParser(prog=PROG, description="Fit a tuned lens (one affine translator per layer).")
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help=f"hub id, local Hugging Face directory, or {EMBEDDED_ID} (default)")
    p.add_argument("--tuned-dir", type=Path, default=DEFAULT_DIR,
                   help="artifacts go to <tuned-dir>/<name>/ (default tuned/)")
    p.add_argument("--text-file", type=Path, default=None,
                   help="training text (UTF-8); default: the built-in prompts and the Python "
                        "language reference shipped with Python")
    p.add_argument("--window", type=int, default=WINDOW, help=f"tokens per window ({WINDOW})")
    p.add_argument("--windows", type=int, default=WINDOWS,
                   help=f"windows used, every {HELD_OUT_EVERY}th held out ({WINDOWS})")
    p.add_argument("--steps", type=int, default=STEPS,
                   help=f"Adam steps on the KL after the least-squares start ({STEPS})")
    p.add_argument("--batch", type=int, default=BATCH, help=f"positions per step ({BATCH})")
    p.add_argument("--seed", type=int, default=SEED, help=f"minibatch seed ({SEED})")
    p.add_argument("--device", default="cpu", choices=DEVICES, help="default cpu")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="default float32")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    return p


def training_text(path: Path | None) -> tuple[str, str]:
    """(text, where it came from)."""
    if path is not None:
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise LensError(f"cannot read --text-file {path}: {first_line(exc)}") from None
    import pydoc_data.topics

    prompts = resources.files("lens").joinpath("probes/prism_prompts.txt").read_text("utf-8")
    lines = [ln for ln in prompts.splitlines() if ln.strip() and not ln.startswith("#")]
    topics = pydoc_data.topics.topics
    text = "\n".join(lines) + "\n\n" + "\n\n".join(topics[k] for k in sorted(topics))
    return text, "built-in prompts + pydoc_data.topics (Python language reference)"


def windows(model: LoadedModel, text: str, *, size: int, count: int) -> list[list[int]]:
    """Up to ``count`` consecutive windows of ``size`` tokens, BOS first where lens prepends it."""
    if size < 2 or count < HELD_OUT_EVERY:
        raise LensError(f"--window must be at least 2 and --windows at least {HELD_OUT_EVERY}")
    ids = list(model.tokenizer(text)["input_ids"])
    bos = model.tokenizer.bos_token_id
    lead = [int(bos)] if model.prepend_bos and bos is not None else []
    step = size - len(lead)
    out = [lead + ids[i:i + step] for i in range(0, len(ids) - step + 1, step)][:count]
    if len(out) < HELD_OUT_EVERY:
        raise LensError(f"the training text has only {len(ids)} tokens: fewer than "
                        f"{HELD_OUT_EVERY} windows of {size}; give more text")
    return out


def split(items: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """(train, held out): every ``HELD_OUT_EVERY``-th item (5th, 10th, …) is held out."""
    held = [x for i, x in enumerate(items) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return [x for i, x in enumerate(items) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1], held


@dataclass(frozen=True, eq=False)
class Residuals:
    resids: Tensor
    """(n_layers + 1, positions, d_model) float32, every position of every window."""
    head: Tensor | None
    """(positions, d_vocab) the model's own logits (kept for the held-out windows only)."""


def capture_all(model: LoadedModel, batch: Sequence[list[int]], *, keep_head: bool) -> Residuals:
    """Residuals (and head logits) of every position, captured without gradients."""
    resids, heads = [], []
    for i in range(0, len(batch), CAPTURE_BATCH):
        for cap in capture_batch(model, batch[i:i + CAPTURE_BATCH]):
            resids.append(cap.resids.float().cpu())
            if keep_head:
                heads.append(cap.head_logits.float().cpu())
    r = torch.cat(resids, dim=1)
    bad = (~torch.isfinite(r)).flatten(1).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise LensError(f"{model.name}: non-finite residuals at layer {bad[0]}; "
                        "a tuned lens cannot be fitted on this model")
    return Residuals(r, torch.cat(heads) if keep_head else None)


def least_squares(X: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
    """(A, b) of ``x ↦ x + x Aᵀ + b`` closest to ``y`` rescaled to ‖x‖, weighted by 1/‖x‖².

    X, Y: (positions, d). Returns A (d, d) in ``nn.Linear`` layout and b (d,).
    """
    x, y = X.double(), Y.double()
    r = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    target = y * (r / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)) - x
    xa = torch.cat([x, torch.ones_like(r)], dim=1)
    weighted = xa / r.pow(2)
    G = weighted.T @ xa
    G.diagonal().add_(RIDGE * float(G.diagonal().mean()))
    sol = torch.linalg.solve(G, weighted.T @ target)
    return sol[:-1].T.float().contiguous(), sol[-1].float()


def _logits(u: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
    return u @ W if b is None else u @ W + b


def _layer_kl(A: Tensor, b: Tensor, train: Tensor, idx: Tensor, model: LoadedModel) -> Tensor:
    """(n,) mean KL(head ‖ lens) in bits per layer at training positions ``idx`` (no grad)."""
    n = A.shape[0]
    W = model.W_U.detach().float().cpu()
    bU = None if model.b_U is None else model.b_U.detach().float().cpu()
    final = model.norms[-1]
    with torch.no_grad():
        target = torch.log_softmax(_logits(final(train[n, idx]), W, bU), dim=-1)
        out = torch.empty(n)
        for layer in range(n):
            h = train[layer, idx]
            logq = torch.log_softmax(_logits(final(h + h @ A[layer].T + b[layer]), W, bU), -1)
            out[layer] = (target.exp() * (target - logq)).sum(-1).mean() / math.log(2)
    return out


def adam_refine(A: Tensor, b: Tensor, train: Tensor, model: LoadedModel, *, steps: int,
                batch: int, seed: int) -> tuple[list[float], list[int]]:
    """Adam on KL(head ‖ lens), every layer at once; A (n, d, d) and b (n, d) in place.

    A layer whose KL on a fixed set of training positions did not go down
    keeps its least-squares translator. Returns the training KL (bits, summed
    over layers) per step and the layers that kept the least-squares start.
    """
    if steps <= 0:
        return [], []
    n = A.shape[0]
    W = model.W_U.detach().float().cpu()
    bU = None if model.b_U is None else model.b_U.detach().float().cpu()
    final = model.norms[-1]
    gen = torch.Generator().manual_seed(seed)
    check = torch.randint(train.shape[1], (CHECK_POSITIONS,), generator=gen)
    start, before = (A.clone(), b.clone()), _layer_kl(A, b, train, check, model)
    A.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.Adam([A, b], lr=LR)
    losses = []
    for _ in range(steps):
        idx = torch.randint(train.shape[1], (batch,), generator=gen)
        with torch.no_grad():
            target = torch.log_softmax(_logits(final(train[n, idx]), W, bU), dim=-1)
        h = train[:n, idx]  # (n, batch, d)
        u = final(h + torch.bmm(h, A.transpose(1, 2)) + b[:, None, :])
        logq = torch.log_softmax(_logits(u, W, bU), dim=-1)
        kl = (target.exp() * (target - logq)).sum(-1).mean(-1).sum() / math.log(2)
        opt.zero_grad()
        kl.backward()
        opt.step()
        losses.append(float(kl.detach()))
    A.requires_grad_(False)
    b.requires_grad_(False)
    kept = (_layer_kl(A, b, train, check, model) >= before).nonzero().flatten().tolist()
    with torch.no_grad():
        A[kept], b[kept] = start[0][kept], start[1][kept]
    return losses, kept


def held_out_table(model: LoadedModel, held: Residuals, lenses: Sequence[Lens]) -> list[dict]:
    """Per layer 0..n: mean KL(P_lens ‖ P_head) per lens (the reverse under ``head_to_lens``)."""
    assert held.head is not None
    n, positions = model.n_layers, held.resids.shape[1]
    sums = {(L, lens.name, d): 0.0 for L in range(n + 1) for lens in lenses for d in (0, 1)}
    for start in range(0, positions, EVAL_CHUNK):
        head = torch.log_softmax(held.head[start:start + EVAL_CHUNK].double(), dim=-1)
        p = head.exp()
        for L in range(n + 1):
            for lens in lenses:
                logq = torch.log_softmax(
                    lens.forward(held.resids[L, start:start + EVAL_CHUNK], L).double(), dim=-1)
                sums[(L, lens.name, 0)] += float((logq.exp() * (logq - head)).sum())
                sums[(L, lens.name, 1)] += float((p * (head - logq)).sum())
    bits = lambda key: round(sums[key] / positions / math.log(2), 6) + 0.0  # noqa: E731
    return [{"layer": L, "positions": positions,
             **{lens.name: bits((L, lens.name, 0)) for lens in lenses},
             "head_to_lens": {lens.name: bits((L, lens.name, 1)) for lens in lenses}}
            for L in range(n + 1)]


def fit(model: LoadedModel, text: str, *, source: str, window: int = WINDOW,
        count: int = WINDOWS, steps: int = STEPS, batch: int = BATCH,
        seed: int = SEED) -> TunedArtifacts:
    """Fit every translator of ``model``; deterministic for a model, text and seed."""
    clock, cpu = time.perf_counter(), time.process_time()
    seconds: dict[str, float] = {}
    train_w, held_w = split(windows(model, text, size=window, count=count))
    train = capture_all(model, train_w, keep_head=False).resids
    held = capture_all(model, held_w, keep_head=True)
    seconds["capture"] = time.perf_counter() - clock
    n, d = model.n_layers, model.d_model
    A, b = torch.zeros(n, d, d), torch.zeros(n, d)
    for layer in range(n):
        A[layer], b[layer] = least_squares(train[layer], train[n])
    seconds["least_squares"] = time.perf_counter() - clock - sum(seconds.values())
    losses, kept = adam_refine(A, b, train, model, steps=steps, batch=batch, seed=seed)
    seconds["adam"] = time.perf_counter() - clock - sum(seconds.values())
    facts = ModelFacts.of(model)
    art = TunedArtifacts.identity(facts)
    art = TunedArtifacts(weight=A.detach().clone(), bias=b.detach().clone(), config=art.config)
    unembed = Unembed(model.W_U, model.b_U, head=model.head, dtype=torch.float32)
    lenses = (NormLens(unembed, model.norms), LogitLens(unembed, model.norms[-1]),
              TunedLens(unembed, model.norms[-1], art))
    table = held_out_table(model, held, lenses)
    seconds["held_out"] = time.perf_counter() - clock - sum(seconds.values())
    provenance = {
        "format_version": FORMAT_VERSION, "lens": "tuned", "model": facts.as_json(),
        "dtype": str(model.dtype).removeprefix("torch."), "artifact_dtype": "float32",
        "text": {"source": source, "sha256": hashlib.sha256(text.encode()).hexdigest(),
                 "window_tokens": window, "windows": len(train_w) + len(held_w),
                 "held_out_every": HELD_OUT_EVERY, "train_positions": int(train.shape[1]),
                 "held_out_positions": int(held.resids.shape[1])},
        "training": {"start": "identity (A = 0, b = 0), then weighted least squares onto the "
                              "last layer's residuals", "ridge": RIDGE,
                     "objective": "KL(model head || lens), bits, summed over layers",
                     "optimizer": "Adam", "lr": LR, "steps": steps, "batch": batch,
                     "seed": seed, "train_kl_first_last": [losses[0], losses[-1]] if losses
                     else None, "check_positions": CHECK_POSITIONS,
                     "layers_kept_least_squares": kept},
        "kl_direction": "KL(P_lens || P_head) (head_to_lens: KL(P_head || P_lens))",
        "held_out_kl_bits": table,
        "verdict": verdict(table[1:n], "tuned"),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "cpu_seconds": round(time.process_time() - cpu, 1),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__,
    }
    return TunedArtifacts(weight=art.weight, bias=art.bias, config=art.config,
                          provenance=provenance)


def report(name: str, art: TunedArtifacts, directory: Path) -> None:
    p = art.provenance or {}
    say = lambda line: print(f"tuned_fit: {name}: {line}")  # noqa: E731
    rows = p["held_out_kl_bits"]
    say(f"held-out KL(P_lens || P_head), bits, mean over {rows[0]['positions']} positions "
        "(tuned/logit: the ratio; target <= 0.5 at layers 1..n-1):")
    print(f"  {'layer':>5} {'norm':>9} {'logit':>9} {'tuned':>9} {'tuned/logit':>12}")
    for r in rows:
        ratio = r["tuned"] / r["logit"] if r["logit"] > 0 else float("nan")
        print(f"  {r['layer']:>5} {r['norm']:>9.4f} {r['logit']:>9.4f} {r['tuned']:>9.4f} "
              f"{ratio:>12.3f}")
    v = p["verdict"]
    say(("the tuned lens beats the logit lens: " if v["beats_logit_lens"] else
         "the tuned lens does NOT beat the logit lens (--tuned auto will not use it): ")
        + v["reason"])
    say(f"seconds {p['seconds']}, CPU seconds {p['cpu_seconds']}; wrote {directory}/")


def fit_model(model_id: str, text: str, source: str, args: argparse.Namespace) -> None:
    from lens.model import load_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = load_model(model_id, device=args.device, dtype=args.dtype)
    art = fit(model, text, source=source, window=args.window, count=args.windows,
              steps=args.steps, batch=args.batch, seed=args.seed)
    directory = args.tuned_dir / model.name
    try:
        art.save(directory)
    except OSError as exc:
        raise LensError(f"cannot write tuned-lens artifacts into {directory}: "
                        f"{exc.strerror or exc}") from exc
    if not args.quiet:
        report(model.name, art, directory)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; 0 when every model was fitted, 1 when any failed (each said in one line)."""
    from lens.embedded import EMBEDDED_ID

    args = build_parser().parse_args(argv)
    try:
        text, source = training_text(args.text_file)
    except LensError as exc:
        print(f"lens: error: {exc}", file=sys.stderr)
        return 1
    status = 0
    for model_id in list(args.models) or [EMBEDDED_ID]:
        try:
            fit_model(model_id, text, source, args)
        except KeyboardInterrupt:
            print("lens: interrupted", file=sys.stderr)
            return 130
        except LensError as exc:
            print(f"lens: error: {exc}", file=sys.stderr)
            status = 1
        except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the rest
            print(f"lens: error: {model_id}: cannot fit a tuned lens: {first_line(exc)}",
                  file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
