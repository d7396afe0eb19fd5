"""Run directories: rotation with an injected clock, concurrent runs, no-replace writes."""

from __future__ import annotations

import datetime as dt
import os
import threading
from pathlib import Path

import pytest

from lens.rundir import LATEST, RunDir, rotate_latest

MINUTE = dt.datetime(2026, 1, 2, 3, 4, 5)


def clock() -> dt.datetime:
    return MINUTE


def _runs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


def test_same_minute_twice_with_existing_directories_of_that_name(tmp_path):
    for name in ("run-20260102-0304", "run-20260102-0304-2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text(name)
    (tmp_path / "run-20260102-0304-5").write_text("a file, not a run")
    contents = []
    for i in range(4):
        with rotate_latest(tmp_path, now=clock) as run:
            assert run.names() == ["timestamp-20260102-0304"]
            assert run.read("timestamp-20260102-0304") == b"2026-01-02T03:04:05\n"
            run.create("which.txt", str(i).encode())
            contents.append(str(i))
    assert _runs(tmp_path) == ["run-20260102-0304", "run-20260102-0304-2", "run-20260102-0304-3",
                               "run-20260102-0304-4", "run-20260102-0304-5", "run-20260102-0304-6",
                               "run-latest"]
    for name in ("run-20260102-0304", "run-20260102-0304-2"):
        assert (tmp_path / name / "keep.txt").read_text() == name
    assert (tmp_path / "run-20260102-0304-5").read_text() == "a file, not a run"
    found = [(tmp_path / n / "which.txt").read_text()
             for n in ("run-20260102-0304-3", "run-20260102-0304-4", "run-20260102-0304-6",
                       LATEST)]
    assert found == contents


def test_latest_without_timestamp_is_named_by_its_mtime(tmp_path):
    (tmp_path / LATEST).mkdir()
    (tmp_path / LATEST / "old.txt").write_text("old")
    stamp = dt.datetime(2025, 6, 7, 8, 9).timestamp()
    os.utime(tmp_path / LATEST, (stamp, stamp))
    rotate_latest(tmp_path, now=clock).close()
    assert (tmp_path / "run-20250607-0809" / "old.txt").read_text() == "old"


def test_a_run_rotated_away_keeps_writing_into_its_own_directory(tmp_path):
    first = rotate_latest(tmp_path, now=clock)
    first.create("a.txt", b"first, early")
    second = rotate_latest(tmp_path, now=clock)
    first.create("b.txt", b"first, after being rotated away")
    second.create("b.txt", b"second")
    assert first.path == tmp_path.resolve() / "run-20260102-0304"
    assert second.path == tmp_path.resolve() / LATEST
    assert (tmp_path / "run-20260102-0304" / "b.txt").read_text() == "first, after being rotated away"
    assert (tmp_path / LATEST / "b.txt").read_text() == "second"
    assert sorted(os.listdir(tmp_path / LATEST)) == ["b.txt", "timestamp-20260102-0304"]
    first.close()
    second.close()


def test_concurrent_rotations_never_share_or_lose_a_run(tmp_path):
    n = 8
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def one_run(i: int) -> None:
        try:
            barrier.wait()
            with rotate_latest(tmp_path, now=clock) as run:
                run.create("who.txt", str(i).encode())
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one_run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    runs = _runs(tmp_path)
    assert len(runs) == n and LATEST in runs
    assert sorted((tmp_path / r / "who.txt").read_text() for r in runs) == sorted(map(str, range(n)))


def test_create_and_commit_never_replace(tmp_path):
    with RunDir.open(tmp_path) as run:
        run.create("a.txt", b"one")
        with pytest.raises(FileExistsError):
            run.create("a.txt", b"two")
        assert run.read("a.txt") == b"one"
        staging = run.subdir(".staging")
        staging.write("b.txt", b"b")
        staging.write("a.txt", b"new a")
        with pytest.raises(FileExistsError):
            run.commit(staging, ["b.txt", "a.txt"])
        assert not run.exists("b.txt")  # all or nothing
        assert sorted(staging.names()) == ["a.txt", "b.txt"]
        staging.close()
        run.remove_tree(".staging")
        assert run.names() == ["a.txt"]
