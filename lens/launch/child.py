"""The process side of the local launcher: ``python -m lens.launch.child JOB``.

``JOB`` is the JSON ``lens.launch.local`` wrote: the model, the exact
``RunConfig`` (``RunConfig.to_json``), the run directory's file descriptor and
the pipe that takes the ``ModelResult`` back. The model's run itself is
``lens.runmodel.run_one``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lens.chatter import libraries_quiet
from lens.config import RunConfig
from lens.errors import LensError
from lens.interrupts import exit_status, handled
from lens.progress import Progress
from lens.rundir import RunDir


def run_job(job: Mapping[str, Any]) -> int:
    """Run one model of a sweep and send back its result (a parent gone is no error)."""
    from lens.probe import resolve_probe
    from lens.runmodel import run_one

    result_fd = int(job["result_fd"])
    out = RunDir(int(job["out_fd"]), Path(job["out_path"]))
    progress = Progress(quiet=bool(job["quiet"]),
                        prefix=f"[{job['index']}/{job['total']}] running: {job['model']}")
    try:
        probe = resolve_probe(job.get("probe", "default"))
    except LensError as exc:
        print(f"lens: error: {exc}", file=sys.stderr)
        return 1
    result = run_one(job["model"], RunConfig.from_json(job["config"]), out, probe,
                     quiet=bool(job["quiet"]), plots=bool(job.get("plots", True)),
                     progress=progress, staging_name=job["staging"])
    with contextlib.suppress(BrokenPipeError, OSError), os.fdopen(result_fd, "wb") as pipe:
        pipe.write(json.dumps(result.to_json()).encode("utf-8"))
    if result.status == "interrupted":
        return exit_status(result.error_class)
    return 0 if result.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    try:
        with handled(sigint_once=True):
            args = list(sys.argv[1:] if argv is None else argv)
            if len(args) != 1:
                print("lens.launch.child: error: run by python -m lens.run, not by hand",
                      file=sys.stderr)
                return 2
            job = json.loads(args[0])
            with libraries_quiet(bool(job["quiet"])):
                return run_job(job)
    except KeyboardInterrupt as exc:
        return exit_status(exc)


if __name__ == "__main__":
    from lens.interrupts import exit_now

    exit_now(main())
