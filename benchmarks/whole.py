"""Whole-process benchmark: ``python -m lens.run`` against the floor script, in pairs.

    python benchmarks/whole.py [--pairs 5] [--model MODEL] [--threads N] [--no-sidecar]

Each pair runs (A) ``python -m lens.run MODEL --out_dir <fresh dir>`` and
(B) ``python benchmarks/floor.py MODEL`` as whole processes, one after the
other, so that load from other processes hits both alike, and alternates
which goes first (A B, B A, A B, …): on a shared VM the second process of a
pair can be seconds slower than the first, whichever it is. It
reports the median of the per-pair ratios A/B (target ≤ 1.25), and beside it
what the processes say about themselves: import time (the floor's own, and
for the run its process time minus the time its ``timings.json`` accounts
for), load time (first load in a process; and a second ``load_model`` in the
same process, from one extra process), the run's write/plot time and its
stage breakdown. Both processes inherit the same environment; ``--threads``
sets ``OMP_NUM_THREADS`` for both. Nothing here is a timed unit test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.25
SECOND_LOAD = """
import json, sys, time
sys.path.insert(0, {repo!r})
from lens.model import load_model
t0 = time.perf_counter(); load_model({model!r}, device={device!r})
t1 = time.perf_counter(); load_model({model!r}, device={device!r})
print(json.dumps({{"first": t1 - t0, "second": time.perf_counter() - t1}}))
"""


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of one whole process and its stdout; a failure ends the benchmark."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return seconds, proc.stdout


def run_lens(model: str, env: dict[str, str], lenses: str | None,
             extra: tuple[str, ...] = ()) -> tuple[float, dict]:
    """(wall seconds, the run's own timings.json) of ``python -m lens.run`` (``extra``: more
    arguments)."""
    out = Path(tempfile.mkdtemp(prefix="lens-whole-"))
    try:
        cmd = [sys.executable, "-m", "lens.run", model, "--out_dir", str(out / "run"), *extra]
        if lenses is not None:
            cmd += ["--lenses", lenses]
        seconds, _ = timed(cmd, env)
        timings = json.loads(next((out / "run").glob("*-timings.json")).read_text())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return seconds, timings


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} cores, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, load average {load:.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python benchmarks/whole.py",
        description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=5, help="A B pairs to run (5)")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both")
    p.add_argument("--no-sidecar", action="store_true",
                   help="run lens.run with --lenses '' (no sidecar) and the floor without the "
                        "logit lens' decode (default: the run's default lenses, whose logit "
                        "sidecar the floor decodes too)")
    p.add_argument("--json", type=Path, default=None, help="also write every number here")
    args = p.parse_args(argv)
    if args.pairs < 1:
        p.error("--pairs must be at least 1")
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    lenses = "" if args.no_sidecar else None
    floor_cmd = [sys.executable, str(REPO / "benchmarks" / "floor.py"), args.model,
                 "--device", args.device, *([] if args.no_sidecar else ["--sidecar"])]
    header = machine()
    print(header, file=sys.stderr)
    timed(floor_cmd, env)  # warm-up: page cache, the embedded model's dequantized cache
    runs, floors = [], []
    for i in range(args.pairs):
        for run_first in (True, False) if i % 2 == 0 else (False, True):
            if run_first:
                runs.append(run_lens(args.model, env, lenses))
            else:
                seconds, out = timed(floor_cmd, env)
                floors.append((seconds, json.loads(out.strip().splitlines()[-1])))
        print(f"pair {i + 1} ({'A B' if i % 2 == 0 else 'B A'}): lens.run {runs[-1][0]:.2f} s, "
              f"floor {seconds:.2f} s, ratio {runs[-1][0] / seconds:.3f}", file=sys.stderr)
    code = SECOND_LOAD.format(repo=str(REPO), model=args.model, device=args.device)
    loads = json.loads(timed([sys.executable, "-c", code], env)[1].strip().splitlines()[-1])

    ratios = [r[0] / f[0] for r, f in zip(runs, floors, strict=True)]
    med = statistics.median
    ratio = med(ratios)
    run_t = [r[1] for r in runs]
    run_import = med(r[0] - t["total"] for r, t in zip(runs, run_t, strict=True))
    stages = {k: med(t.get(k, 0.0) for t in run_t) for k in ("load", "head_probes", "write")}
    passes = med(sum(t.get("passes", {}).values()) for t in run_t)
    floor_stage = {k: med(f[1][k] for f in floors) for k in floors[0][1]}
    lines = [
        header,
        f"model {args.model}, OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', '(unset)')}, "
        f"{args.pairs} pairs (A = python -m lens.run, B = benchmarks/floor.py; A B, B A, ...)"
        + (", no sidecar lens" if args.no_sidecar else ", default lenses (logit sidecar)"),
        f"  lens.run  median {med(r[0] for r in runs):7.2f} s  "
        f"[{' '.join(f'{r[0]:.2f}' for r in runs)}]",
        f"  floor     median {med(f[0] for f in floors):7.2f} s  "
        f"[{' '.join(f'{f[0]:.2f}' for f in floors)}]",
        f"  ratio A/B median of pairs = {ratio:.3f}  [{' '.join(f'{x:.3f}' for x in ratios)}]  "
        f"target <= {TARGET_RATIO}: {'OK' if ratio <= TARGET_RATIO else 'MISSED'}",
        f"  import: floor {floor_stage['import']:.2f} s; lens.run (process minus its "
        f"timings total) {run_import:.2f} s",
        f"  load (first in a process): floor {floor_stage['load']:.2f} s, lens.run "
        f"{stages['load']:.2f} s; one process loading twice: first {loads['first']:.2f} s, "
        f"second {loads['second']:.2f} s",
        f"  lens.run stages: passes {passes:.2f} s, head_probes {stages['head_probes']:.2f} s, "
        f"write (serialise + plots) {stages['write']:.2f} s",
        "  floor stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in floor_stage.items()),
    ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"machine": header, "ratios": ratios, "ratio": ratio,
                                         "runs": runs, "floors": floors, "loads": loads},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
