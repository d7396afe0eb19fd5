"""``python -m lens.run [MODEL …]``: the probe on one or more models (SPEC §8–§9).

One model named on the command line runs in this process. Several models, a
``--models-file`` or a ``--preset`` make a sweep (``lens.sweep``): each model in
its own worker process (``lens.worker``), a failure record for each failing one,
and a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from lens.config import DEVICES, DTYPES, PRISM_MODES, RAW_LENS_MODES, TUNED_MODES, RunConfig
from lens.cli import OneLineParser
from lens.errors import LensError
from lens.probe import builtin_probes, resolve_probe

PROG = "python -m lens.run"


def build_parser() -> argparse.ArgumentParser:
    from lens.embedded import EMBEDDED_ID
    from lens.sweep import PRESETS

    p = OneLineParser(prog=PROG,
                      description="Layer-by-layer logit-lens probe of causal language models.")
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help=f"hub id, local Hugging Face directory, or {EMBEDDED_ID} (default)")
    p.add_argument("--models-file", type=Path, default=None, metavar="FILE",
                   help="more models: one id or path a line, # comments")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="more models: baseline10 = the ten models of the baseline study")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto: first of cuda, mps, cpu whose free memory fits the model "
                        "(default auto)")
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="let the bridge place a model larger than one GPU: auto, balanced, "
                        "sequential, or a JSON map of module names to devices")
    p.add_argument("--n-devices", type=int, default=None, metavar="N",
                   help="split the model over N CUDA devices")
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
    p.add_argument("--prism", default="auto", choices=PRISM_MODES,
                   help="Prism sidecar lens: auto uses compatible artifacts, on requires them, "
                        "off disables (default auto)")
    p.add_argument("--prism-dir", type=Path, default=None,
                   help="Prism artifacts root: reads <dir>/<name>/ (default prisms/)")
    p.add_argument("--tuned", default="auto", choices=TUNED_MODES,
                   help="tuned-lens sidecar: auto uses compatible artifacts, on requires them, "
                        "off disables (default auto)")
    p.add_argument("--tuned-dir", type=Path, default=Path("tuned"),
                   help="tuned-lens artifacts root: reads <dir>/<name>/ (default tuned/)")
    p.add_argument("--probe", default="default", metavar="NAME_OR_FILE",
                   help=f"built-in probe ({', '.join(builtin_probes())}) or a probe file "
                        "(.json/.yaml, see README) (default: default)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="prompts per forward pass for probes with more than one fact (default 8)")
    p.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    p.add_argument("--self-test", action="store_true",
                   help="check the normalisation against the model itself; write nothing")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    return p


def config_from(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        copy_threshold=args.copy_threshold, copy_margin=args.copy_margin,
        copy_window_k=args.copy_window_k, raw_lens=args.raw_lens, fp32_unembed=args.fp32_unembed,
        device=args.device, dtype=args.dtype, prism=args.prism, prism_dir=args.prism_dir,
        tuned=args.tuned, tuned_dir=args.tuned_dir,
        keep_residuals=args.keep_residuals, device_map=args.device_map, n_devices=args.n_devices,
        batch_size=args.batch_size,
    )


def self_test_main(model_ids: Sequence[str], config: RunConfig, *, quiet: bool = False) -> int:
    """``--self-test``: a PASS/FAIL line per check and model; writes nothing; 1 on any FAIL."""
    from lens.model import load_model
    from lens.selftest import self_test

    status = 0
    for model_id in model_ids:
        try:
            model = load_model(model_id, device=config.device, dtype=config.dtype,
                               device_map=config.device_map_value(), n_devices=config.n_devices)
            checks = self_test(model, config)
        except LensError as exc:
            print(f"FAIL {model_id}: could not run the checks: {exc}")
            status = 1
            continue
        except Exception as exc:  # noqa: BLE001 - one broken model must not hide the others
            print(f"FAIL {model_id}: could not run the checks: {type(exc).__name__}: {exc}")
            status = 1
            continue
        finally:
            model = None  # free it before the next model
        for c in checks:
            if not (quiet and c.ok):
                print(f"{'PASS' if c.ok else 'FAIL'} {model_id}: {c.name}: {c.detail}")
        status |= 0 if all(c.ok for c in checks) else 1
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0: every model succeeded, 130: interrupted)."""
    from lens.embedded import EMBEDDED_ID
    from lens.progress import Progress
    from lens.rundir import prepare_out_dir, rotate_latest
    from lens.sweep import model_list, run_sweep
    from lens.worker import run_one

    args = build_parser().parse_args(argv)
    logging.getLogger("lens").setLevel(logging.ERROR if args.quiet else logging.WARNING)
    try:
        config = config_from(args)
        models, sweep = model_list(args.models, models_file=args.models_file, preset=args.preset,
                                   default=EMBEDDED_ID)
        if args.self_test:
            return self_test_main(models, config, quiet=args.quiet)
        probe = resolve_probe(args.probe)
        with prepare_out_dir(args.out_dir) if args.out_dir else rotate_latest(args.output_root) as out:
            if sweep:
                return run_sweep(models, config, out, quiet=args.quiet, probe=args.probe,
                                 plots=not args.no_plots)
            result = run_one(models[0], config, out, probe, quiet=args.quiet,
                             plots=not args.no_plots,
                             progress=Progress(quiet=args.quiet, prefix=models[0]))
    except LensError as exc:
        print(f"lens: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lens: interrupted", file=sys.stderr)
        return 130
    if result.status == "interrupted":
        print("lens: interrupted", file=sys.stderr)
        return 130
    if not result.ok:
        print(f"lens: error: {result.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
