"""All-or-nothing: a run's files go into a private staging directory, then move in together.

The staging directory ``.lens-staging-<name>-<hex>`` is locked (``flock``) by
the process that writes it, for as long as it lives. Once every file is
written, a manifest naming them is written last; only then do the files move
into the run directory, ``output-<name>.json`` last and never over an
existing file.

A run killed outright (SIGKILL, power loss) leaves its staging directory,
unlocked. The next run of that model into the directory recovers it first:
without a manifest nothing had moved yet, and the staging directory is
removed; with one, the commit is completed from it. Either way it says so.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping

from lens.errors import LensError
from lens.outputs import STAGING_PREFIX, commit_order, is_staging
from lens.rundir import RunDir

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no recovery of killed runs
    fcntl = None  # type: ignore[assignment]

MANIFEST = ".lens-manifest.json"


class OutputExists(LensError):
    """The run directory already holds this model's files: refused, and no failure record
    is added next to them (they belong to an earlier run)."""


def exists_message(out: RunDir, name: str) -> str:
    return (f"{out.path / name} exists from an earlier run; lens never overwrites a run: "
            "choose a new --out_dir or omit it to rotate run-latest/")


def _lock(staging: RunDir) -> bool:
    """Take the staging directory's lock; False when a live process holds it."""
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(staging.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def commit_files(out: RunDir, name: str, files: Mapping[str, bytes], staging_name: str) -> None:
    """Write ``files`` into the staging directory ``staging_name``, then move them into ``out``.

    ``name`` is the model's ``<name>``; its ``output-<name>.json`` moves in last.

    Raises:
        OutputExists: A file of that name exists in ``out``; nothing was moved.
        LensError: The files cannot be written (full disk, permissions).
    """
    order = commit_order(name, files)
    try:
        staging = out.subdir(staging_name)
        try:
            _lock(staging)
            for file in order:
                staging.write(file, files[file])
            staging.write(MANIFEST, json.dumps(order).encode("utf-8"))
            out.commit(staging, order)
        finally:
            staging.close()
            out.remove_tree(staging_name)
    except FileExistsError as exc:
        raise OutputExists(exists_message(out, str(exc.filename or exc))) from exc
    except OSError as exc:
        raise LensError(f"cannot write outputs into {out.path}: {exc.strerror or exc}; "
                        "free space or choose another --out_dir") from exc


def recover(out: RunDir, name: str) -> list[str]:
    """Finish or remove what killed runs of ``name`` left in ``out``; one line per staging dir.

    Staging directories still locked belong to live runs and are left alone.
    """
    notes = []
    for entry in out.names():
        if not is_staging(entry, name):
            continue
        try:
            staging = RunDir.open(out.path / entry, dir_fd=out.fd)
        except OSError:
            continue
        try:
            if not _lock(staging):
                continue
            try:
                order = json.loads(staging.read(MANIFEST))
            except (OSError, ValueError):
                order = None
            if order is None:
                notes.append(f"removed {entry}, left by a run killed before it wrote its outputs")
            else:
                moved = []
                for file in order:
                    if staging.exists(file) and not out.exists(file):
                        out.commit(staging, [file])
                        moved.append(file)
                notes.append(f"completed the outputs of a run killed while moving them in "
                             f"({len(moved)} of {len(order)} files moved now)")
        except OSError as exc:
            notes.append(f"could not recover {entry}: {exc.strerror or exc}")
        finally:
            staging.close()
        with contextlib.suppress(OSError):
            out.remove_tree(entry)
    return notes


__all__ = ["MANIFEST", "STAGING_PREFIX", "OutputExists", "commit_files", "exists_message",
           "recover"]
