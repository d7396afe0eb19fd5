"""Fault fixtures about a run's life: re-runs, signals, kills, summaries, library chatter."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from faultkit import TINY, Run, run_main
from lens.testing import REPO


def models_file(tmp: Path, *models: str) -> list[str]:
    path = tmp / "models.txt"
    path.write_text("\n".join(models) + "\n")
    return ["--models-file", str(path)]


def earlier_run(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A complete run of tiny-gpt2 already in the output directory."""
    assert run_main(tmp, [TINY], quiet=True).status == 0


def check_earlier_kept(run: Run) -> None:
    assert not [n for n in run.files if n.endswith(".error.json")], sorted(run.files)
    assert "output-tiny-gpt2.json" in run.files and "output-tiny-gpt2-records.csv" in run.files


def summary_rows(run: Run) -> dict[str, str]:
    from lens.writers import read_csv_dicts

    return {r["model"]: r["status"] for r in read_csv_dicts(run.files["summary.csv"])}


# ---------------------------------------------------------------- the CLI in a process of its own

HOOK = '''\
"""Loaded by every Python process of a fault case: makes a stage wait for the test's signal."""
import os
import pathlib
import time

_MODE, _MARK = os.environ.get("FAULT_HOOK", ""), os.environ.get("FAULT_MARK", "")


def _wait():
    pathlib.Path(_MARK).write_text(str(os.getpid()))
    time.sleep(120)


if _MODE == "analyse":
    import lens.report
    lens.report.analyse = lambda *a, **k: _wait()
elif _MODE in ("stage", "commit", "link"):
    import lens.rundir
    _move, _write, _calls = lens.rundir._move_no_replace, lens.rundir.RunDir.write, []

    def _slow_move(src_fd, src, dst_fd, dst):
        _calls.append(src)
        if len(_calls) == 2 and _MODE == "commit":
            _wait()
        if len(_calls) == 2 and _MODE == "link":
            os.link(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
            _wait()
        return _move(src_fd, src, dst_fd, dst)

    def _slow_write(self, name, data):
        if _MODE == "stage" and name.startswith("output-"):
            _wait()
        return _write(self, name, data)

    lens.rundir._move_no_replace = _slow_move
    lens.rundir.RunDir.write = _slow_write
'''


def cli(tmp: Path, args: list[str], *, quiet: bool, hook: str = "", signum: int | None = None,
        env: dict[str, str] | None = None, plots: bool = False) -> Run:
    """``python -m lens.run ARGS`` in a process of its own; with ``hook``, the named stage
    waits (``HOOK``) until the test sends ``signum`` to the process. ``plots`` keeps the
    PNGs (and so the plot workers) on."""
    out = tmp / "out"
    hook_dir = tmp / "hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    mark = tmp / f"mark-{time.monotonic_ns()}"
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(hook_dir), str(REPO))),
                "FAULT_HOOK": hook, "FAULT_MARK": str(mark), **(env or {})}
    argv = [sys.executable, "-m", "lens.run", *args, *(["--quiet"] if quiet else []),
            *([] if plots else ["--no-plots"]), "--out_dir", str(out)]
    proc = subprocess.Popen(argv, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    if hook and signum is not None:
        deadline = time.monotonic() + 120
        while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signum)
    _, err = proc.communicate(timeout=180)
    run = Run(proc.returncode, err.decode(), out, tmp)
    run.extra["waiting_pid"] = int(mark.read_text()) if mark.exists() else None
    return run


# ---------------------------------------------------------------- summaries that cannot be written


def summary_fails(after: int, times: int) -> Callable[[Path, pytest.MonkeyPatch], None]:
    """Summary writes fail (full disk) from the ``after``-th one on, ``times`` times."""
    def setup(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from lens.rundir import RunDir

        write, create, seen = RunDir.write, RunDir.create, []

        def failing(original: Callable) -> Callable:
            def method(self: RunDir, name: str, data: bytes) -> None:
                if name.startswith("summary"):
                    seen.append(name)
                    if after <= len(seen) < after + times:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return original(self, name, data)
            return method

        monkeypatch.setattr(RunDir, "write", failing(write))
        monkeypatch.setattr(RunDir, "create", failing(create))
    return setup


def check_summary_never_written(run: Run) -> None:
    assert "output-tiny-gpt2.json" in run.files and "output-model.error.json" in run.files
    assert "summary.csv" not in run.files
    assert [line for line in run.lines if "cannot write" in line and "summary.csv" in line]
    assert len(run.lines) == 2, run.err  # the missing model's line and the summary's


def check_summary_recovered(run: Run) -> None:
    assert summary_rows(run) == {TINY: "ok", "./no/such/model": "failed"}
    assert len(run.lines) == 1 and "does not exist" in run.lines[0], run.err


# ---------------------------------------------------------------- signals and kills


def sigterm(hook: str, *, sweep: bool = False) -> Callable[[Path, pytest.MonkeyPatch, bool], Run]:
    """SIGTERM the run while ``hook`` holds it (a single run, or a sweep's parent)."""
    def run(tmp: Path, monkeypatch: pytest.MonkeyPatch, quiet: bool) -> Run:
        args = models_file(tmp, TINY, "tests/models/tiny-llama") if sweep else [TINY]
        return cli(tmp, args, quiet=quiet, hook=hook, signum=signal.SIGTERM)
    return run


def check_terminated(run: Run) -> None:
    assert list(run.files) == ["output-tiny-gpt2.error.json"], sorted(run.files)
    record = json.loads(run.files["output-tiny-gpt2.error.json"])
    assert record["stage"] == "interrupted" and record["error_class"] == "Terminated"
    assert run.lines == ["lens: interrupted"], run.err


def check_sweep_terminated(run: Run) -> None:
    record = json.loads(run.files["output-tiny-gpt2.error.json"])
    assert record["stage"] == "interrupted" and record["error_class"] == "Terminated"
    assert summary_rows(run) == {TINY: "interrupted", "tests/models/tiny-llama": "not_run"}
    assert not [n for n in run.files if n.startswith("output-tiny-llama")]
    assert len(run.lines) == 1 and run.lines[0].startswith("lens: interrupted: "), run.err
    pid = run.extra["waiting_pid"]
    deadline = time.monotonic() + 10  # the child must not outlive its parent
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the sweep's child process outlived its parent")


def killed_then_rerun(hook: str) -> Callable[[Path, pytest.MonkeyPatch, bool], Run]:
    """SIGKILL a single run while ``hook`` holds it, then run the same model into the directory."""
    def run(tmp: Path, monkeypatch: pytest.MonkeyPatch, quiet: bool) -> Run:
        killed = cli(tmp, [TINY], quiet=True, hook=hook, signum=signal.SIGKILL)
        assert killed.status == -signal.SIGKILL, killed.err
        assert [p.name for p in killed.out.iterdir() if p.name.startswith(".lens-staging-")]
        monkeypatch.chdir(REPO)
        return run_main(tmp, [TINY], quiet=quiet)
    return run


def check_completed(run: Run) -> None:
    assert "completed the outputs of a run killed while moving them in" in run.err
    assert "exists from an earlier run" in run.lines[-1] and len(run.lines) == 2, run.err
    assert "output-tiny-gpt2.json" in run.files and "output-tiny-gpt2-records.csv" in run.files
    assert not [n for n in run.files if n.endswith(".error.json")]


def check_cleaned(run: Run) -> None:
    assert "left by a run killed before it wrote its outputs" in run.lines[0], run.err
    assert "output-tiny-gpt2.json" in run.files


# ---------------------------------------------------------------- library chatter


def chatty_libraries(tmp: Path, monkeypatch: pytest.MonkeyPatch, quiet: bool) -> Run:
    """An OpenMP setting libgomp rejects and an unusable matplotlib config dir, with plots."""
    (tmp / "file").write_text("x")
    env = {"OMP_NUM_THREADS": "many", "MPLCONFIGDIR": str(tmp / "file" / "mpl")}
    out = tmp / "out"
    argv = [sys.executable, "-m", "lens.run", TINY, "--out_dir", str(out),
            *(["--quiet"] if quiet else [])]
    proc = subprocess.run(argv, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **env},
                          capture_output=True, timeout=300)
    run = Run(proc.returncode, proc.stderr.decode(), out, tmp)
    run.extra.update(quiet=quiet, stdout=proc.stdout.decode())
    return run


def check_quiet(run: Run) -> None:
    assert "output-tiny-gpt2-heatmap.png" in run.files
    if run.extra["quiet"]:
        assert run.err == "" and run.extra["stdout"] == "", run.err
    else:
        assert "lens: tiny-gpt2:" in run.extra["stdout"]
