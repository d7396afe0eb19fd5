"""lens against the physical floor of its own work, on one loaded model.

    python benchmarks/bench.py [--model embedded|wide|PATH] [--reps 3] [--threads 2]

In one process, on the same loaded model, it measures

(a) the floor: the irreducible work of a run. The three passes' forwards with
    residual capture (``lens.model.capture``), the test prompts as ONE padded
    head forward (``lens.model.head_logits``), and ONE batched norm-lens decode
    of exactly the residuals the run decodes (every layer × every position of
    every pass): norm, ``@ W_U (+ b_U)``, log-softmax, top-20, chunked at the
    same logits budget as the run (``lens.decode.CHUNK_ELEMENTS``).
(b) the full run minus model load: ``lens.report.analyse`` (three passes, every
    emitter, head probes, report) + ``lens.outputs.run_files`` + writing every
    file with ``lens.writers.write_atomic`` into a temporary directory.

Floor and full run alternate (a, b, a, b, …) after one warm-up each, so that
load from other processes hits both alike; medians are reported, with the
ratio b/a, a per-stage breakdown of both, and the peak memory beyond the
loaded model (the kernel's RSS high-water mark, reset before each measured
call; on CUDA the allocator's peak, and every stage waits for its kernels)
against the size of one pass's full logits tensor. The second load of
the model is timed in fresh processes (cache warm).

``--model wide`` builds a seeded random-weight Llama-style model with a wide
vocabulary (24 layers, d_model 512, vocab 128000 by default) in a temporary
directory and loads it through ``lens.model.load_model`` like any local model.
Targets are printed next to the numbers; nothing here is a timed unit test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's lens, not whatever is installed

import torch  # noqa: E402

import lens  # noqa: E402
from lens.config import Fact, RunConfig, default_probe  # noqa: E402
from lens.decode import CHUNK_ELEMENTS  # noqa: E402
from lens.embedded import EMBEDDED_ID, embedded_model_dir, is_embedded  # noqa: E402
from lens.model import LoadedModel, capture, head_logits, load_model, tokenize  # noqa: E402
from lens.outputs import run_files as output_files  # noqa: E402
from lens.outputs import timings_file  # noqa: E402
from lens.passes import passes_for  # noqa: E402
from lens.report import analyse  # noqa: E402
from lens.runmodel import evaluation_stub  # noqa: E402
from lens.timing import StageTimer  # noqa: E402
from lens.unembed import analysis_dtype, unembed_dtype  # noqa: E402
from lens.writers import json_bytes, write_atomic  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from benchsupport import build_wide_model, finish, peak_beyond  # noqa: E402

TARGET_RATIO = 1.5
TARGET_LOAD_S = 5.0
TARGET_MEMORY = 2.0
TOPK = 20
MB = 1 << 20


# --- (a) the floor and (b) the full run -----------------------------------------------------

def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def _timed(times: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        finish()
        times[name] = times.get(name, 0.0) + time.perf_counter() - start


def floor_run(model: LoadedModel, fact: Fact, config: RunConfig) -> dict[str, float]:
    """The irreducible work: forwards with capture, head-probe forwards, one batched decode."""
    times: dict[str, float] = {}
    start, cpu_start = time.perf_counter(), cpu_seconds()
    with torch.no_grad():
        with _timed(times, "capture forwards"):
            resids = [capture(model, tokenize(model, p.prompt())).resids for p in passes_for(fact)]
        with _timed(times, "head-probe forward (one batch)"):
            head_logits(model, [tokenize(model, prompt) for prompt in fact.test_prompts])
        udtype = unembed_dtype(model.dtype, fp32_unembed=config.fp32_unembed)
        adtype = analysis_dtype(model.dtype)
        W = model.W_U.to(udtype)
        b = None if model.b_U is None else model.b_U.to(udtype)
        stacked = torch.cat(resids, dim=1)  # (n_layers + 1, all positions, d_model)
        n_layers, rows, _ = stacked.shape
        per_chunk = max(1, CHUNK_ELEMENTS // max(1, rows * W.shape[-1]))
        for first in range(0, n_layers, per_chunk):
            layers = range(first, min(n_layers, first + per_chunk))
            with _timed(times, "norm + matmul"):
                x = torch.stack([model.norms[i](stacked[i]) for i in layers]).to(udtype)
                logits = x @ W
                if b is not None:
                    logits += b
            with _timed(times, "log-softmax"):
                logp = torch.log_softmax(logits.to(adtype), dim=-1)
            with _timed(times, "top-k"):
                torch.topk(logp, min(TOPK, logp.shape[-1]), dim=-1)
            del x, logits, logp
    finish()
    times["total"] = time.perf_counter() - start
    times["cpu"] = cpu_seconds() - cpu_start
    return times


def full_run(model: LoadedModel, config: RunConfig, out_root: Path) -> dict[str, float]:
    """What ``python -m lens.run`` does after loading the model, stage by stage."""
    probe = default_probe()
    timer = StageTimer()
    start, cpu_start = time.perf_counter(), cpu_seconds()
    with timer.stage("analyse"):
        run = analyse(model, probe, config, timer=timer)
    with timer.stage("serialise"):
        files = output_files(run, config)
        files[f"evaluation-{model.name}.md"] = evaluation_stub(model.name, run.report)
    out = Path(tempfile.mkdtemp(prefix="bench-out-", dir=out_root))
    with timer.stage("write"):
        for name, data in files.items():
            write_atomic(out / name, data)
        write_atomic(out / timings_file(model.name), json_bytes(timer.as_dict()))
    total, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    shutil.rmtree(out, ignore_errors=True)
    passes = sum(v for k, v in timer.as_dict().get("passes", {}).items())
    capture_s, decode_s, emit_s = (timer.seconds(f"breakdown/{k}")
                                   for k in ("capture", "decode", "emit"))
    head_s = timer.seconds("head_probes")
    return {
        "capture (3 forwards)": capture_s,
        "decode (norm, matmul, softmax, entropy, top-k)": decode_s,
        "emitters (records)": emit_s,
        "passes, other (tokenize, gold, context)": passes - capture_s - decode_s - emit_s,
        "head probes (one padded forward)": head_s,
        "report, other (summaries, temperatures)": timer.seconds("analyse") - passes - head_s,
        "serialise (CSV/JSON bytes)": timer.seconds("serialise"),
        "write (atomic files)": timer.seconds("write"),
        "total": total,
        "cpu": cpu,
    }


# --- load time in fresh processes ------------------------------------------------------------

LOAD_SNIPPET = """
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads({threads})
from lens.model import load_model
t1 = time.perf_counter()
load_model({model!r}, device={device!r}, dtype={dtype!r})
t2 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "load": t2 - t1}}))
"""


def fresh_load_times(model_id: str, *, reps: int, threads: int, device: str,
                     dtype: str) -> list[dict[str, float]]:
    code = LOAD_SNIPPET.format(repo=str(REPO), threads=threads, model=model_id, device=device,
                               dtype=dtype)
    out = []
    for _ in range(reps):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True, cwd=REPO)
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


# --- report -------------------------------------------------------------------------------------

def _median_dict(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _table(title: str, med: dict[str, float], of: float) -> list[str]:
    lines = [f"  {title:<48} {'s':>8} {'%':>6}"]
    for name, value in med.items():
        if name not in ("total", "cpu"):
            lines.append(f"  {name:<48} {value:8.3f} {100 * value / of:5.1f}%")
    lines.append(f"  {'total':<48} {med['total']:8.3f}")
    return lines


def _seconds(values: Iterable[float], digits: int = 3) -> str:
    return " ".join(f"{v:.{digits}f}" for v in values)


def _ok(good: bool) -> str:
    return "OK" if good else "MISSED"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench.py",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded",
                   help="embedded (SmolLM2-135M-Instruct), wide (synthetic), or a model path/id")
    p.add_argument("--reps", type=int, default=3, help="measured repetitions of (a) and (b) (3)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (2)")
    p.add_argument("--device", default="cpu", help="device (cpu)")
    p.add_argument("--dtype", default="auto", help="compute dtype (auto: the run's policy)")
    p.add_argument("--load-reps", type=int, default=None,
                   help="fresh-process loads to time (default --reps; 0 skips)")
    p.add_argument("--wide-layers", type=int, default=24)
    p.add_argument("--wide-d-model", type=int, default=512)
    p.add_argument("--wide-vocab", type=int, default=128000)
    p.add_argument("--wide-dir", type=Path, default=None,
                   help="build the wide model here and reuse it on later runs (default: a "
                        "temporary directory, removed afterwards)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be at least 1")
    torch.set_num_threads(args.threads)
    config = RunConfig(device=args.device, dtype=args.dtype)
    fact = default_probe().facts[0]

    with tempfile.TemporaryDirectory(prefix="lens-bench-") as tmp:
        tmp_dir = Path(tmp)
        if args.model == "wide":
            wide = args.wide_dir or tmp_dir / "wide-vocab"
            if not (wide / "config.json").exists():
                print(f"building the wide model ({args.wide_layers} layers, d_model "
                      f"{args.wide_d_model}, vocab {args.wide_vocab}) ...", file=sys.stderr)
                build_wide_model(wide, layers=args.wide_layers, d_model=args.wide_d_model,
                                 vocab=args.wide_vocab)
            model_id = str(wide)
        elif is_embedded(args.model):
            model_id = EMBEDDED_ID
            embedded_model_dir()  # build the cache now, so fresh loads below are second loads
        else:
            model_id = args.model

        start = time.perf_counter()
        model = load_model(model_id, device=args.device, dtype=args.dtype)
        in_process_load = time.perf_counter() - start

        floor_runs: list[dict[str, float]] = []
        full_runs: list[dict[str, float]] = []
        floor_run(model, fact, config)  # warm-up: first-call costs (allocator, kernels)
        full_run(model, config, tmp_dir)
        # Memory first: after many repetitions the allocator's free lists, not the run,
        # decide how much of a new allocation is already resident.
        mem_floor, how = peak_beyond(lambda: floor_run(model, fact, config), model.device)
        mem_full, _ = peak_beyond(lambda: full_run(model, config, tmp_dir), model.device)
        for _ in range(args.reps):
            floor_runs.append(floor_run(model, fact, config))
            full_runs.append(full_run(model, config, tmp_dir))

        load_reps = args.reps if args.load_reps is None else args.load_reps
        loads = fresh_load_times(model_id, reps=load_reps, threads=args.threads,
                                 device=args.device, dtype=args.dtype) if load_reps else []

    a, b = _median_dict(floor_runs), _median_dict(full_runs)
    ratio = b["total"] / a["total"]
    pair_ratios = [f["total"] / g["total"] for f, g in zip(full_runs, floor_runs, strict=True)]
    seqs = [len(tokenize(model, ps.prompt())) for ps in passes_for(fact)]
    itemsize = torch.empty((), dtype=analysis_dtype(model.dtype)).element_size()
    layers = model.n_layers + 1
    one_pass = layers * seqs[0] * model.d_vocab * itemsize
    all_passes = layers * sum(seqs) * model.d_vocab * itemsize
    rows = layers * sum(seqs)
    gflop = 2 * rows * model.d_model * model.d_vocab / 1e9

    names = [f"{ps.prompt_id}/{ps.variant}" for ps in passes_for(fact)]
    out = [
        f"lens benchmark: {model.name}: {model.n_layers} layers, d_model {model.d_model}, "
        f"vocab {model.d_vocab}, {str(model.dtype).removeprefix('torch.')} on {model.device}, "
        f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')} (lens from {Path(lens.__file__).parent})",
        f"passes: {', '.join(f'{n} {s} tokens' for n, s in zip(names, seqs, strict=True))}; "
        f"decoded residuals: {layers} layers x {sum(seqs)} positions = {rows} rows "
        f"({gflop:.1f} GFLOP through W_U); {len(fact.test_prompts)} test prompts, one forward",
        "floor (a): the 3 forwards with residual capture + the test prompts as one batch",
        f"           + ONE batched norm-lens decode of those {rows} residuals (norm, matmul",
        f"           with W_U, log-softmax, top-{TOPK}), chunked at the run's 2^25 logits "
        "per matmul",
        "full  (b): lens.report.analyse (3 passes, every emitter, head probes, report)",
        "           + run_files + write_atomic of every file; model load excluded",
        "",
        f"median of {args.reps} interleaved repetitions (a, b, a, b, ...), after one warm-up each:",
        f"  floor (a)  {a['total']:8.3f} s   [{_seconds(r['total'] for r in floor_runs)}]",
        f"  full  (b)  {b['total']:8.3f} s   [{_seconds(r['total'] for r in full_runs)}]",
        f"  ratio b/a = {ratio:.3f}   (per pair: {_seconds(pair_ratios)}; "
        f"target <= {TARGET_RATIO}) {_ok(ratio <= TARGET_RATIO)}",
        f"  CPU seconds (all threads; less sensitive to other processes' load): floor "
        f"{a['cpu']:.3f}, full {b['cpu']:.3f}, ratio {b['cpu'] / a['cpu']:.3f}",
        "",
        "floor (a), median seconds per stage:",
        *_table("stage", a, a["total"]),
        "full (b), median seconds per stage:",
        *_table("stage", b, b["total"]),
        "",
        f"peak memory beyond the loaded model ({how}):",
        f"  floor (a)  {mem_floor / MB:8.1f} MB",
        f"  full  (b)  {mem_full / MB:8.1f} MB",
        f"  one pass's full logits ({layers} x {seqs[0]} x {model.d_vocab} x {itemsize} B) = "
        f"{one_pass / MB:.1f} MB; all passes' logits = {all_passes / MB:.1f} MB",
        f"  memory (b) / one pass's logits = {mem_full / one_pass:.2f}   "
        f"(target <= {TARGET_MEMORY}) {_ok(mem_full <= TARGET_MEMORY * one_pass)}",
        "",
        f"load, in this process (first here): {in_process_load:.2f} s",
    ]
    if loads:
        load_s = statistics.median(x["load"] for x in loads)
        import_s = statistics.median(x["import"] for x in loads)
        verdict = (f"(target <= {TARGET_LOAD_S} s for the embedded model) "
                   f"{_ok(load_s <= TARGET_LOAD_S)}" if model_id == EMBEDDED_ID else "")
        out.append(f"load, fresh process, cache warm: load_model {load_s:.2f} s "
                   f"[{_seconds((x['load'] for x in loads), 2)}] + python/torch/lens import "
                   f"{import_s:.2f} s {verdict}".rstrip())
    print("\n".join(out))
    if args.json:
        args.json.write_text(json.dumps({
            "model": model.name, "n_layers": model.n_layers, "d_model": model.d_model,
            "d_vocab": model.d_vocab, "threads": torch.get_num_threads(), "reps": args.reps,
            "floor": floor_runs, "full": full_runs, "ratio": ratio,
            "memory": {"floor": mem_floor, "full": mem_full, "one_pass_logits": one_pass,
                       "all_passes_logits": all_passes, "method": how},
            "load": {"in_process": in_process_load, "fresh": loads},
        }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
