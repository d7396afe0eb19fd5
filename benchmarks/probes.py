"""Many-fact probe throughput: facts per second of ``python -m lens.run --probe``.

    python benchmarks/probes.py [--probe capitals] [--facts N] [--model MODEL] [--no-plots]
                                [--baseline DIR --pairs N]

Runs ``python -m lens.run MODEL --probe P --out_dir <fresh dir>`` as a whole
process and reports facts per second over the run's own analysis and writing
(``timings.json``: total minus load) and over the whole process, plus the
process's CPU seconds (all threads; less sensitive to other processes' load
than wall time). ``--facts N`` generates an N-fact probe by cycling the
built-in ``capitals`` facts under fresh ids, each cycle's prompts tagged
``[c] `` (the same work per fact as ``capitals``, no prompt shared across
cycles). ``--threads`` sets ``OMP_NUM_THREADS``; ``--lenses ''`` runs
without sidecar lenses (a default run decodes the logit lens at every
position too, doubling the per-position work of a probe). ``--baseline DIR``
runs another checkout (its own ``.venv``) and this one in pairs, alternating
which goes first (baseline first in the first pair), and reports the median
ratio of their throughputs; the baseline gets a cache of its own
(``DIR/.lens-cache``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def generated_probe(n_facts: int, dest: Path) -> Path:
    """An ``n_facts`` probe: the capitals facts cycled, each copy under its own id.

    Every prompt of the c-th cycle starts with ``"[c] "``, so no two cycles share
    a prompt (a run forwards each distinct prompt once) while within a cycle,
    as in ``capitals``, each fact's control is another fact's prompt.
    """
    base = json.loads((REPO / "lens" / "probes" / "capitals.json").read_text())["facts"]

    def copy(i: int) -> dict:
        fact, tag = base[i % len(base)], f"[{i // len(base)}] "
        out = dict(fact, id=f"{fact['id']}-{i:04d}", prompt=tag + fact["prompt"])
        if fact.get("no_filler"):
            out["no_filler"] = tag + fact["no_filler"]
        if fact.get("control"):
            out["control"] = dict(fact["control"], prompt=tag + fact["control"]["prompt"])
        return out

    facts = [copy(i) for i in range(n_facts)]
    dest.write_text(json.dumps({"name": f"capitals-x{n_facts}", "facts": facts}, indent=1))
    return dest


def run_probe(python: str, cwd: Path, probe: str, args: argparse.Namespace,
              env: dict[str, str], *, lenses: str | None) -> dict:
    """One whole ``python -m lens.run --probe`` of the checkout at ``cwd``: its numbers."""
    tmp = Path(tempfile.mkdtemp(prefix="lens-probes-"))
    try:
        cmd = [python, "-m", "lens.run", args.model, "--probe", probe, "--quiet",
               "--out_dir", str(tmp / "run"), *(["--no-plots"] if args.no_plots else []),
               *(["--lenses", lenses] if lenses is not None else [])]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        timings = json.loads(next((tmp / "run").glob("*-timings.json")).read_text())
        main_json = min((tmp / "run").glob("output-*.json"), key=lambda f: len(f.name))
        report = json.loads(main_json.read_text())  # output-<name>.json, the shortest name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = int(report.get("probe", {}).get("n_facts", 1))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    work = timings["total"] - timings["load"]
    return {"n": n, "work": work, "wall": wall, "cpu": cpu, "timings": timings}


def describe(label: str, r: dict) -> str:
    n, work, wall, cpu = r["n"], r["work"], r["wall"], r["cpu"]
    return (f"  {label}: {n} facts: analysis + writing {work:.1f} s = {n / work:.3f} facts/s; "
            f"whole process {wall:.1f} s = {n / wall:.3f} facts/s; process CPU {cpu:.1f} s "
            f"({cpu / n:.2f} CPU s per fact)\n    stages: "
            + json.dumps({k: v for k, v in r["timings"].items() if k != "breakdown"}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/probes.py",
                                description=__doc__.split("\n")[0])
    p.add_argument("--probe", default="capitals", help="built-in probe or probe file (capitals)")
    p.add_argument("--facts", type=int, default=None, help="generate a probe of this many facts")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS")
    p.add_argument("--no-plots", action="store_true", help="pass --no-plots to the run")
    p.add_argument("--lenses", default=None,
                   help="pass --lenses to the run ('' = no sidecar lens; default: the run's)")
    p.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                   help="another checkout with its own .venv (e.g. a git worktree of an older "
                        "commit): run it and this one in pairs and report the throughput ratio "
                        "(--lenses goes to this checkout only)")
    p.add_argument("--pairs", type=int, default=1, help="baseline/this pairs with --baseline (1)")
    args = p.parse_args(argv)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="lens-probe-file-"))
    try:
        probe = str(generated_probe(args.facts, tmp / "probe.json")) if args.facts else args.probe
        print(f"{args.model}, probe {probe if not args.facts else f'{args.facts} generated facts'}"
              f", OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', '(unset)')}, load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        if args.baseline is None:
            print(describe("this checkout", run_probe(sys.executable, REPO, probe, args, env,
                                                      lenses=args.lenses)))
            return 0
        base_dir = args.baseline.resolve()
        base_python = str(base_dir / ".venv" / "bin" / "python")
        # a cache of its own: an older lens may fingerprint the embedded model differently,
        # and the two would rebuild each other's cache on every run
        base_env = {**env, "LENS_CACHE_DIR": str(base_dir / ".lens-cache")}
        ratios = []
        for i in range(args.pairs):  # the baseline first, then this checkout first, ...
            got = {}
            for side in ("base", "this") if i % 2 == 0 else ("this", "base"):
                got[side] = (run_probe(base_python, base_dir, probe, args, base_env, lenses=None)
                             if side == "base" else
                             run_probe(sys.executable, REPO, probe, args, env, lenses=args.lenses))
            base, this = got["base"], got["this"]
            ratios.append(base["work"] / this["work"])
            order = "baseline first" if i % 2 == 0 else "this checkout first"
            print(f"pair {i + 1} ({order}), load average {os.getloadavg()[0]:.1f}:\n"
                  + describe(f"baseline {args.baseline}", base) + "\n"
                  + describe("this checkout", this)
                  + f"\n  throughput this/baseline (analysis + writing): {ratios[-1]:.2f}x, "
                    f"whole process: {base['wall'] / this['wall']:.2f}x", flush=True)
        print(f"median throughput ratio over {len(ratios)} pairs: "
              f"{statistics.median(ratios):.2f}x  [{' '.join(f'{r:.2f}' for r in ratios)}]")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
