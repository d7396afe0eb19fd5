"""``python -m lens.run [MODEL …]``: the probe on one or more models (README, Running).

One model named on the command line runs in this process. Several models, a
``--models-file`` or a ``--preset`` make a sweep (``lens.sweep``): each model in
its own process (``lens.launch.local``) or Ray task (``--launcher ray``,
``lens.launch.ray_launcher``), a failure record for each failing one, and a
summary. ``--resume DIR`` finishes a sweep (``lens.resume``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lens.cli import OneLineParser, add_config_flags, config_from
from lens.config import RunConfig
from lens.errors import LensError, first_line
from lens.launch import LAUNCHERS
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
    p.add_argument("--out_dir", type=Path, default=None,
                   help="write here instead of rotating run-latest/ under --output-root")
    p.add_argument("--output-root", type=Path, default=Path("."),
                   help="where run-latest/ lives (default: the current directory)")
    p.add_argument("--probe", default="default", metavar="NAME_OR_FILE",
                   help=f"built-in probe ({', '.join(builtin_probes())}) or a probe file "
                        "(.json/.yaml, see README) (default: default)")
    p.add_argument("--launcher", default="local", choices=LAUNCHERS,
                   help="where a sweep's models run: local (one worker process after another) "
                        "or ray (one Ray task each, concurrently; pip install 'lens[ray]') "
                        "(default local)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster to join (auto: the one this node belongs to); default: "
                        "RAY_ADDRESS if set, else a new local Ray instance")
    p.add_argument("--resume", type=Path, default=None, metavar="DIR",
                   help="finish the sweep in DIR: keep models whose outputs there are complete, "
                        "run the failed and missing ones (models: as given, else DIR's summary)")
    p.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    p.add_argument("--self-test", action="store_true",
                   help="check the normalisation against the model itself; write nothing")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    add_config_flags(p)
    return p


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
            print(f"FAIL {model_id}: could not run the checks: {first_line(exc)}")
            status = 1
            continue
        finally:
            model = None  # free it before the next model
        for c in checks:
            if not (quiet and c.ok):
                print(f"{'PASS' if c.ok else 'FAIL'} {model_id}: {c.name}: {c.detail}")
        status |= 0 if all(c.ok for c in checks) else 1
    return status


def resume_main(args: argparse.Namespace, config: RunConfig) -> int:
    """``--resume DIR``: the sweep's models (as given, else from DIR's summary) into DIR."""
    from lens.resume import models_of
    from lens.rundir import RunDir
    from lens.sweep import model_list, run_sweep

    if args.out_dir is not None or args.self_test:
        flag = "--out_dir" if args.out_dir is not None else "--self-test"
        raise LensError(f"--resume DIR writes into DIR; drop {flag}")
    if not args.resume.is_dir():
        raise LensError(f"--resume {args.resume}: no such directory; give the run directory "
                        "of the sweep to finish")
    resolve_probe(args.probe)
    if args.launcher == "ray":
        from lens.launch.ray_launcher import require_ray

        require_ray()
    with RunDir.open(args.resume) as out:
        given = args.models or args.models_file or args.preset
        listed = [*args.models] if given else models_of(out)
        models, _ = model_list(listed, models_file=args.models_file, preset=args.preset,
                               default="")
        return run_sweep(models, config, out, quiet=args.quiet, probe=args.probe,
                         plots=not args.no_plots, launcher=args.launcher,
                         ray_address=args.ray_address, resume=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0: every model succeeded, 1: some failed,
    130: Ctrl-C, 143: SIGTERM)."""
    from lens.chatter import libraries_quiet
    from lens.interrupts import exit_status, handled

    args = build_parser().parse_args(argv)
    try:
        with handled(), libraries_quiet(args.quiet):
            return _run(args)
    except LensError as exc:
        print(f"lens: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print("lens: interrupted", file=sys.stderr)
        return exit_status(exc)


def _run(args: argparse.Namespace) -> int:
    from lens.embedded import EMBEDDED_ID
    from lens.interrupts import exit_status
    from lens.progress import Progress
    from lens.rundir import prepare_out_dir, rotate_latest
    from lens.runmodel import run_one
    from lens.sweep import model_list, run_sweep

    config = config_from(args)
    if args.resume is not None:
        return resume_main(args, config)
    models, sweep = model_list(args.models, models_file=args.models_file, preset=args.preset,
                               default=EMBEDDED_ID)
    if args.self_test:
        return self_test_main(models, config, quiet=args.quiet)
    probe = resolve_probe(args.probe)
    if args.launcher == "ray":
        from lens.launch.ray_launcher import require_ray

        require_ray()
    with prepare_out_dir(args.out_dir) if args.out_dir else rotate_latest(args.output_root) as out:
        if sweep or args.launcher == "ray":
            return run_sweep(models, config, out, quiet=args.quiet, probe=args.probe,
                             plots=not args.no_plots, launcher=args.launcher,
                             ray_address=args.ray_address)
        result = run_one(models[0], config, out, probe, quiet=args.quiet,
                         plots=not args.no_plots,
                         progress=Progress(quiet=args.quiet, prefix=models[0]))
    if result.status == "interrupted":
        print("lens: interrupted", file=sys.stderr)
        return exit_status(result.error_class)
    if not result.ok:
        print(f"lens: error: {result.message}", file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    """The ``lens-run`` console script and ``python -m``: ``main``, then ``exit_now``."""
    from lens.interrupts import exit_now

    exit_now(main())


if __name__ == "__main__":
    cli()
