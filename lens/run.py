"""``python -m lens.run [MODEL …]``: the probe on one or more models (SPEC §8–§9)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

from lens.config import DEVICES, DTYPES, PRISM_MODES, RAW_LENS_MODES, Probe, RunConfig, default_probe
from lens.errors import LensError
from lens.writers import write_atomic

PROG = "python -m lens.run"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from lens.embedded import EMBEDDED_ID

    p = _Parser(prog=PROG, description="Layer-by-layer logit-lens probe of causal language models.")
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help=f"hub id, local Hugging Face directory, or {EMBEDDED_ID} (default)")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto: first of cuda, mps, cpu (default auto)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="compute dtype; auto follows the policy: cuda fp16 (Gemma bf16), mps fp16, "
                        "cpu fp32 (default auto)")
    p.add_argument("--out_dir", type=Path, default=None,
                   help="write here instead of rotating run-latest/ under --output-root")
    p.add_argument("--output-root", type=Path, default=Path("."),
                   help="where run-latest/ lives (default: the current directory)")
    p.add_argument("--fp32-unembed", action="store_true",
                   help="decode through an fp32 copy of W_U even for fp32/fp16 compute")
    p.add_argument("--keep-residuals", action="store_true",
                   help="also save the per-layer residuals as output-<name>-residuals.pt")
    p.add_argument("--copy-threshold", type=float, default=0.95, help="p_top1 above this (0.95)")
    p.add_argument("--copy-margin", type=float, default=0.10, help="p_top1 - p_top2 above this (0.10)")
    p.add_argument("--copy-window-k", type=int, default=1, help="top-1 ids in the copy window (1)")
    p.add_argument("--raw-lens", default="sample", choices=RAW_LENS_MODES,
                   help="raw-vs-norm lens check: off, sample (4 layers) or full (default sample)")
    p.add_argument("--prism", default="auto", choices=PRISM_MODES, help="Prism sidecar (default auto)")
    p.add_argument("--prism-dir", type=Path, default=None, help="Prism artifacts root (default prisms/)")
    p.add_argument("--self-test", action="store_true",
                   help="check the normalisation against the model itself; write nothing")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    return p


def config_from(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        copy_threshold=args.copy_threshold, copy_margin=args.copy_margin,
        copy_window_k=args.copy_window_k, raw_lens=args.raw_lens, fp32_unembed=args.fp32_unembed,
        device=args.device, dtype=args.dtype, prism=args.prism, prism_dir=args.prism_dir,
        keep_residuals=args.keep_residuals,
    )


def evaluation_stub(name: str, report: dict) -> bytes:
    d = report["diagnostics"]
    top = report["final_prediction"]["topk"][0]
    lines = [
        f"# Evaluation: {name}", "",
        f"- model: `{d['model']}` ({report['model_stats']['num_layers']} layers, {d['dtype']})",
        f"- final top-1: {top[0]!r} (p = {top[1]:.3f})",
        f"- L_copy = {d['L_copy']}, L_semantic = {d['L_semantic']}, "
        f"lens artifact risk = {d['raw_lens_check']['summary']['lens_artifact_risk']}", "",
        "## Reading", "", "_Write your interpretation of the per-layer records here._", "",
    ]
    return "\n".join(lines).encode("utf-8")


def timings_file(name: str) -> str:
    """Seconds per stage: a file of their own, outside the byte-reproducible outputs."""
    return f"output-{name}-timings.json"


def run_model(model_id: str, config: RunConfig, out_dir: Path, probe: Probe, *, quiet: bool) -> None:
    """Load, analyse and write one model's outputs into ``out_dir``; never overwrite a file."""
    from lens.model import load_model
    from lens.report import analyse, output_files
    from lens.timing import StageTimer
    from lens.writers import json_bytes

    timer = StageTimer()
    with timer.stage("load"):
        model = load_model(model_id, device=config.device, dtype=config.dtype)
    run = analyse(model, probe, config, timer=timer)
    timer.start("write")
    files = output_files(run, config)
    files[f"evaluation-{model.name}.md"] = evaluation_stub(model.name, run.report)
    clash = [n for n in (*files, timings_file(model.name)) if (out_dir / n).exists()]
    if clash:
        raise LensError(f"{out_dir / clash[0]} exists from an earlier run; lens never overwrites "
                        "a run: choose a new --out_dir or omit it to rotate run-latest/")
    try:
        for name, data in files.items():
            write_atomic(out_dir / name, data)
    except OSError as exc:
        raise LensError(f"cannot write outputs into {out_dir}: {exc.strerror or exc}; "
                        "free space or choose another --out_dir") from exc
    timer.stop("write")
    with contextlib.suppress(OSError):  # timings are a convenience, never a failed run
        write_atomic(out_dir / timings_file(model.name), json_bytes(timer.as_dict()))
    if not quiet:
        d = run.report["diagnostics"]
        top = run.report["final_prediction"]["topk"][0]
        print(f"lens: {model.name}: {model.n_layers} layers, final top-1 {top[0]!r} p={top[1]:.3f}, "
              f"L_copy={d['L_copy']} L_semantic={d['L_semantic']} "
              f"({timer.total():.1f}s) -> {out_dir}")
        print(f"lens: {model.name}: seconds: {timer.summary()}", file=sys.stderr)


def self_test_main(model_ids: Sequence[str], config: RunConfig) -> int:
    from lens.model import load_model
    from lens.selftest import self_test

    status = 0
    for model_id in model_ids:
        checks = self_test(load_model(model_id, device=config.device, dtype=config.dtype), config)
        for c in checks:
            print(f"{'PASS' if c.ok else 'FAIL'} {model_id}: {c.name}: {c.detail}")
        status |= 0 if all(c.ok for c in checks) else 1
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0: every model succeeded)."""
    from lens.embedded import EMBEDDED_ID
    from lens.rundir import prepare_out_dir, rotate_latest

    args = build_parser().parse_args(argv)
    models = list(args.models) or [EMBEDDED_ID]
    try:
        config = config_from(args)
        if args.self_test:
            return self_test_main(models, config)
        out_dir = prepare_out_dir(args.out_dir) if args.out_dir else rotate_latest(args.output_root)
        probe = default_probe()
        status = 0
        for model_id in models:
            try:
                run_model(model_id, config, out_dir, probe, quiet=args.quiet)
            except LensError as exc:
                print(f"lens: error: {exc}", file=sys.stderr)
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
