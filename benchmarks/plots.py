"""Plot cost per model: ``python -m lens.run`` with and without its plots, in pairs.

    python benchmarks/plots.py [--pairs 5] [--model MODEL] [--probe P] [--threads N]

Each pair runs the same ``python -m lens.run`` twice as whole processes, once
with its PNGs and once with ``--no-plots``, alternating which goes first
(A B, B A, …), so that load from other processes hits both alike. The PNGs
are drawn by plot workers that start with the run and prepare during the
model load (``lens/plotpool.py``, ``lens/plotprep.py``); the run waits for them
only in its write stage. A model's plot cost is therefore its write stage
(``timings.json`` ``write``) beyond the same run's without plots. Reported:
that difference per pair and its median (target ≤ 0.3 s per model), the two
write stages, and the whole processes' difference beside it (noisier: every
other stage of a run varies as much). Nothing here is a timed unit test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from whole import machine, run_lens

TARGET_SECONDS = 0.3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/plots.py",
                                description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=5, help="pairs to run (5)")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--probe", default=None, help="a probe for both runs (default: the default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both")
    p.add_argument("--json", type=Path, default=None, help="also write every number here")
    args = p.parse_args(argv)
    if args.pairs < 1:
        p.error("--pairs must be at least 1")
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    common = ("--device", args.device, *(("--probe", args.probe) if args.probe else ()))
    header = machine()
    print(header, file=sys.stderr)
    run_lens(args.model, env, None, ("--no-plots", *common))  # warm-up: page cache, model cache
    pairs = []
    for i in range(args.pairs):
        order = (True, False) if i % 2 == 0 else (False, True)
        got = {plots: run_lens(args.model, env, None, (*common, *([] if plots else ["--no-plots"])))
               for plots in order}
        pairs.append({"plots": got[True], "no_plots": got[False]})
        print(f"pair {i + 1}: write {got[True][1]['write']:.3f} s with plots, "
              f"{got[False][1]['write']:.3f} s without; whole process {got[True][0]:.2f} s, "
              f"{got[False][0]:.2f} s", file=sys.stderr)

    med = statistics.median
    cost = [q["plots"][1]["write"] - q["no_plots"][1]["write"] for q in pairs]
    whole = [q["plots"][0] - q["no_plots"][0] for q in pairs]
    lines = [
        header,
        f"model {args.model}, probe {args.probe or '(default)'}, "
        f"OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', '(unset)')}, {args.pairs} pairs",
        f"  plots per model (write stage with plots - without) median {med(cost):.3f} s  "
        f"[{' '.join(f'{x:.3f}' for x in cost)}]  target <= {TARGET_SECONDS}: "
        f"{'OK' if med(cost) <= TARGET_SECONDS else 'MISSED'}",
        f"  write stage: with plots median {med(q['plots'][1]['write'] for q in pairs):.3f} s, "
        f"without {med(q['no_plots'][1]['write'] for q in pairs):.3f} s",
        f"  whole process with plots - without: median {med(whole):.2f} s  "
        f"[{' '.join(f'{x:.2f}' for x in whole)}]",
    ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"machine": header, "cost": cost, "median": med(cost),
                                         "whole": whole, "pairs": pairs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
