"""Run directories: ``run-latest/`` rotation that never overwrites or deletes a run.

Guarantees (POSIX):

- ``rotate_latest`` renames an existing ``run-latest/`` to ``run-<its timestamp>``
  (``-2``, ``-3``… when taken) and creates a fresh ``run-latest/``, under an
  exclusive lock on ``<root>/.lens-rotate.lock``: concurrent runs rotate one
  after the other, so no two runs ever share a directory and no run is lost,
  even within one minute.
- A run holds its directory open (``RunDir``) and creates every file relative
  to that handle, so a run that a newer run rotates away keeps writing into
  its own, renamed directory, never into the newer ``run-latest/``.
- ``RunDir.create`` and ``RunDir.commit`` never replace an existing file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from lens.errors import LensError
from lens.writers import write_atomic

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: rotation without the lock
    fcntl = None  # type: ignore[assignment]

LATEST = "run-latest"
LOCK = ".lens-rotate.lock"
STAMP_PREFIX = "timestamp-"
STAMP_FORMAT = "%Y%m%d-%H%M"
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)


class RunDir:
    """An output directory held open by a file descriptor.

    Files are created with ``dir_fd``-relative calls, so they land in this
    directory whatever it is renamed to while the run goes on. ``fd`` can be
    handed to a worker process (``subprocess.Popen(pass_fds=...)``).
    """

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self._opened_as = Path(path)

    @classmethod
    def open(cls, path: Path, *, dir_fd: int | None = None) -> RunDir:
        return cls(os.open(path, _DIR_FLAGS, dir_fd=dir_fd), path)

    @property
    def path(self) -> Path:
        """Where the directory is now (it may have been renamed since it was opened)."""
        with contextlib.suppress(OSError):
            if sys.platform.startswith("linux"):
                return Path(os.readlink(f"/proc/self/fd/{self.fd}"))
            if fcntl is not None and hasattr(fcntl, "F_GETPATH"):
                raw = fcntl.fcntl(self.fd, fcntl.F_GETPATH, bytes(1024))
                return Path(os.fsdecode(raw.rstrip(b"\0")))
        return self._opened_as

    def __str__(self) -> str:
        return str(self.path)

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def exists(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def names(self) -> list[str]:
        return sorted(os.listdir(self.fd))

    def read(self, name: str) -> bytes:
        fd = os.open(name, os.O_RDONLY, dir_fd=self.fd)
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def write(self, name: str, data: bytes) -> None:
        """Write ``name`` atomically, replacing a file of that name (use for files this run owns)."""
        write_atomic(Path(name), data, dir_fd=self.fd)

    def create(self, name: str, data: bytes) -> None:
        """Write ``name`` atomically; ``FileExistsError`` if it exists (never replaces)."""
        tmp = f".{name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.new"
        write_atomic(Path(tmp), data, dir_fd=self.fd)
        try:
            _move_no_replace(self.fd, tmp, self.fd, name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=self.fd)

    def subdir(self, name: str) -> RunDir:
        """Create and open the directory ``name`` inside this one."""
        os.mkdir(name, dir_fd=self.fd)
        return RunDir(os.open(name, _DIR_FLAGS, dir_fd=self.fd), self._opened_as / name)

    def commit(self, staging: RunDir, names: Iterable[str]) -> None:
        """Move ``names`` from ``staging`` into this directory, all or none.

        A name counts as moved from the moment its move starts, so an interrupt
        (Ctrl-C, SIGTERM) at any point, even inside a move, rolls back every
        file of ours; a file here that is not ours (the move found it in place)
        is never touched.

        Raises:
            FileExistsError: One of the names exists here; nothing was moved.
        """
        started: list[str] = []
        try:
            for name in names:
                started.append(name)
                try:
                    _move_no_replace(staging.fd, name, self.fd, name)
                except FileExistsError:
                    started.pop()
                    raise
        except BaseException:
            for name in started:
                self._take_back(staging, name)
            raise

    def _take_back(self, staging: RunDir, name: str) -> None:
        """Undo a move of ``name`` that may have completed, half-completed or not started."""
        with contextlib.suppress(OSError):
            try:
                src = os.stat(name, dir_fd=staging.fd, follow_symlinks=False)
            except FileNotFoundError:  # moved: take it back
                _move_no_replace(self.fd, name, staging.fd, name)
                return
            dst = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            if (src.st_dev, src.st_ino) == (dst.st_dev, dst.st_ino):  # linked, not yet unlinked
                os.unlink(name, dir_fd=self.fd)

    def remove_tree(self, name: str) -> None:
        """Delete the private directory ``name`` (staging) and everything in it."""
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(name, dir_fd=self.fd)

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)


def _move_no_replace(src_fd: int, src: str, dst_fd: int, dst: str) -> None:
    """Rename without ever replacing ``dst`` (a hard link, then unlink; rename as fallback)."""
    try:
        os.link(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system
        try:
            os.stat(dst, dir_fd=dst_fd, follow_symlinks=False)
        except FileNotFoundError:
            os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
            return
        raise FileExistsError(dst) from None
    os.unlink(src, dir_fd=src_fd)


def _stamp_of(run_dir: Path) -> str:
    stamps = sorted(p.name[len(STAMP_PREFIX):] for p in run_dir.glob(f"{STAMP_PREFIX}*"))
    if stamps:
        return stamps[-1]
    return dt.datetime.fromtimestamp(run_dir.lstat().st_mtime).strftime(STAMP_FORMAT)


def _free_name(root: Path, stem: str) -> Path:
    candidate, n = root / stem, 1
    while os.path.lexists(candidate):
        n += 1
        candidate = root / f"{stem}-{n}"
    return candidate


@contextlib.contextmanager
def _rotation_lock(root: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def rotate_latest(root: Path, *, now: Callable[[], dt.datetime] = dt.datetime.now) -> RunDir:
    """Move an existing ``run-latest`` aside to ``run-<its timestamp>`` and make a new one.

    A name already taken (two runs in one minute) gets a ``-2``, ``-3``… suffix.
    Returns the new, open ``run-latest`` holding its ``timestamp-YYYYMMDD-HHMM`` file.
    """
    root = Path(root)
    stamp = now()
    try:
        root.mkdir(parents=True, exist_ok=True)
        latest = root / LATEST
        with _rotation_lock(root):
            if os.path.lexists(latest):
                os.rename(latest, _free_name(root, f"run-{_stamp_of(latest)}"))
            latest.mkdir()
            run = RunDir.open(latest)
            try:
                run.create(f"{STAMP_PREFIX}{stamp.strftime(STAMP_FORMAT)}",
                           (stamp.isoformat(timespec="seconds") + "\n").encode("utf-8"))
            except BaseException:
                run.close()
                raise
    except OSError as exc:
        raise LensError(f"cannot create run directory under {root}: {exc.strerror or exc}; "
                        "choose a writable place with --out_dir") from exc
    return run


def prepare_out_dir(path: Path) -> RunDir:
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
    return RunDir.open(path)
