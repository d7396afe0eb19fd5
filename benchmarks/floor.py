"""The whole-process floor of ``python -m lens.run``: only the irreducible work, as a process.

    python benchmarks/floor.py [MODEL] [--sidecar] [--device cpu] [--dtype auto]

What a run cannot avoid, on the same model, in a fresh process:

- importing torch and loading the model (``lens.model.load_model``, the same
  loader as the run, so the floor pays the same boot);
- the three passes' forwards with residual capture (``lens.model.capture``);
- the fact's test prompts as ONE padded forward (``lens.model.head_logits``);
- decoding exactly the rows the outputs contain: every layer × every position
  of pos/orig (its per-position records), the last position of pos/no_filler
  and ctl/orig (their next-token records only): norm, ``@ W_U (+ b_U)``
  through ``lens.unembed.Unembed`` (the run's matmul: column blocks on CPU),
  log-softmax and top-20, chunked at the run's ``lens.decode.CHUNK_ELEMENTS``
  logits per matmul. ``--sidecar`` decodes the same rows once more through the
  final norm: the logit-lens sidecar, which ``python -m lens.run`` decodes by default.

It computes no entropy, metric or record and writes nothing, and it exits
without the interpreter's teardown, as ``python -m lens.run`` does: everything
else a run does counts as its overhead. On a GPU each stage ends by waiting
for its kernels (``torch.cuda.synchronize``): a run reads its results back,
and a floor whose kernels were still queued when it exited would time nothing.
``benchmarks/whole.py`` times this script against ``python -m lens.run``. It
prints one line of JSON: seconds per stage.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lens

import torch  # noqa: E402
from benchsupport import finish  # noqa: E402  (benchmarks/, this script's folder)

from lens.config import default_probe  # noqa: E402
from lens.decode import CHUNK_ELEMENTS  # noqa: E402
from lens.model import capture, head_logits, load_model, tokenize  # noqa: E402
from lens.passes import passes_for  # noqa: E402
from lens.unembed import Unembed, analysis_dtype  # noqa: E402

TOPK = 20


def decode_rows(model, rows: torch.Tensor, norm_of_layer) -> None:  # type: ignore[no-untyped-def]
    """(layers, n, d_model) residual rows → top-k of their log-softmax, chunked like a run."""
    adtype = analysis_dtype(model.dtype)
    # the run's matmul: on CPU in float32, column blocks (lens.unembed.CPU_BLOCK_COLUMNS)
    unembed = Unembed(model.W_U, model.b_U, dtype=adtype)
    n_layers, n, _ = rows.shape
    per_chunk = max(1, CHUNK_ELEMENTS // max(1, n * unembed.d_vocab))
    for first in range(0, n_layers, per_chunk):
        layers = range(first, min(n_layers, first + per_chunk))
        logits = unembed(torch.stack([norm_of_layer(i)(rows[i]) for i in layers]))
        torch.topk(torch.log_softmax(logits, dim=-1), TOPK, dim=-1)


def main() -> int:
    p = argparse.ArgumentParser(
        prog="python benchmarks/floor.py",
        description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default="SmolLM2-135M-Instruct")
    p.add_argument("--sidecar", action="store_true",
                   help="also decode the same rows through the final norm (logit-lens sidecar)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    args = p.parse_args()
    times = {"import": time.perf_counter() - START}
    t = time.perf_counter()
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    times["load"] = time.perf_counter() - t
    fact = default_probe().facts[0]
    t = time.perf_counter()
    with torch.no_grad():
        caps = [capture(model, tokenize(model, ps.prompt())) for ps in passes_for(fact)]
        finish(model.device)
        times["forwards"] = time.perf_counter() - t
        t = time.perf_counter()
        head_logits(model, [tokenize(model, prompt) for prompt in fact.test_prompts])
        finish(model.device)
        times["head_probes"] = time.perf_counter() - t
        t = time.perf_counter()
        # pos/orig at every position; the other passes at their last position only
        rows = torch.cat([caps[0].resids] + [c.resids[:, -1:] for c in caps[1:]], dim=1)
        decode_rows(model, rows, lambda i: model.norms[i])
        if args.sidecar:
            decode_rows(model, rows, lambda i: model.norms[-1])
        finish(model.device)
        times["decode"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - START
    print(json.dumps({k: round(v, 6) for k, v in times.items()}), flush=True)
    return 0


if __name__ == "__main__":
    os._exit(main())  # no interpreter teardown: python -m lens.run skips it too
