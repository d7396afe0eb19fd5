"""Run directories: ``run-latest/`` rotation that never overwrites or deletes a run."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from pathlib import Path

from lens.errors import LensError

LATEST = "run-latest"
STAMP_PREFIX = "timestamp-"
STAMP_FORMAT = "%Y%m%d-%H%M"


def _stamp_of(run_dir: Path) -> str:
    stamps = sorted(p.name[len(STAMP_PREFIX):] for p in run_dir.glob(f"{STAMP_PREFIX}*"))
    if stamps:
        return stamps[-1]
    return dt.datetime.fromtimestamp(run_dir.stat().st_mtime).strftime(STAMP_FORMAT)


def _free_name(root: Path, stem: str) -> Path:
    candidate, n = root / stem, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{stem}-{n}"
    return candidate


def rotate_latest(root: Path, *, now: Callable[[], dt.datetime] = dt.datetime.now) -> Path:
    """Move an existing ``run-latest`` aside to ``run-<its timestamp>`` and make a new one.

    A name already taken (two runs in one minute) gets a ``-2``, ``-3``… suffix.
    Returns the new, empty ``run-latest`` holding its ``timestamp-YYYYMMDD-HHMM`` file.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
        latest = root / LATEST
        for _ in range(10):
            if latest.exists():
                os.rename(latest, _free_name(root, f"run-{_stamp_of(latest)}"))
            try:
                latest.mkdir()
                break
            except FileExistsError:
                continue
        else:
            raise LensError(f"could not create {latest}: other runs keep creating it; use --out_dir")
        (latest / f"{STAMP_PREFIX}{now().strftime(STAMP_FORMAT)}").write_text(
            now().isoformat(timespec="seconds") + "\n", encoding="utf-8")
    except OSError as exc:
        raise LensError(f"cannot create run directory under {root}: {exc.strerror or exc}; "
                        "choose a writable place with --out_dir") from exc
    return latest


def prepare_out_dir(path: Path) -> Path:
    """An explicit ``--out_dir``: created when missing, refused when it is a file."""
    if path.exists() and not path.is_dir():
        raise LensError(f"--out_dir {path} is an existing file; give a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LensError(f"cannot create --out_dir {path}: {exc.strerror or exc}; "
                        "choose a writable directory") from exc
    if not os.access(path, os.W_OK):
        raise LensError(f"--out_dir {path} is not writable; choose a writable directory")
    return path
