"""Many-fact probe throughput: facts per second of ``python -m lens.run --probe``.

    python benchmarks/probes.py [--probe capitals] [--facts N] [--model MODEL] [--no-plots]

Runs ``python -m lens.run MODEL --probe P --out_dir <fresh dir>`` as a whole
process and reports facts per second over the run's own analysis and writing
(``timings.json``: total minus load) and over the whole process, plus the
process's CPU seconds (all threads; less sensitive to other processes' load
than wall time). ``--facts N`` generates an N-fact probe by cycling the
built-in ``capitals`` facts under fresh ids (the same prompts, so the same
work per fact). ``--threads`` sets ``OMP_NUM_THREADS``; ``--lenses ''`` runs
without sidecar lenses (a default run decodes the logit lens at every
position too, doubling the per-position work of a probe).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def generated_probe(n_facts: int, dest: Path) -> Path:
    """An ``n_facts`` probe: the capitals facts cycled, each copy under its own id."""
    base = json.loads((REPO / "lens" / "probes" / "capitals.json").read_text())
    facts = [dict(base["facts"][i % len(base["facts"])],
                  id=f"{base['facts'][i % len(base['facts'])]['id']}-{i:04d}")
             for i in range(n_facts)]
    dest.write_text(json.dumps({"name": f"capitals-x{n_facts}", "facts": facts}, indent=1))
    return dest


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
    args = p.parse_args(argv)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="lens-probes-"))
    try:
        probe = str(generated_probe(args.facts, tmp / "probe.json")) if args.facts else args.probe
        cmd = [sys.executable, "-m", "lens.run", args.model, "--probe", probe, "--quiet",
               "--out_dir", str(tmp / "run"), *(["--no-plots"] if args.no_plots else []),
               *(["--lenses", args.lenses] if args.lenses is not None else [])]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(f"lens.run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        timings = json.loads(next((tmp / "run").glob("*-timings.json")).read_text())
        main_json = min((tmp / "run").glob("output-*.json"), key=lambda f: len(f.name))
        report = json.loads(main_json.read_text())  # output-<name>.json, the shortest name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = int(report.get("probe", {}).get("n_facts", 1))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    work = timings["total"] - timings["load"]
    print(f"{args.model}, probe {probe if not args.facts else f'{args.facts} generated facts'}, "
          f"OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', '(unset)')}, load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"  {n} facts: analysis + writing {work:.1f} s = {n / work:.3f} facts/s; whole process "
          f"{wall:.1f} s = {n / wall:.3f} facts/s; process CPU {cpu:.1f} s "
          f"({cpu / n:.2f} CPU s per fact)")
    print("  run stages: " + json.dumps({k: v for k, v in timings.items() if k != "breakdown"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
