"""Sweeps on a real local Ray instance (2 CPUs, started once for the session): ``--launcher ray``.

Skipped only when Ray is not installed (``pip install 'lens[ray]'``; CI installs it).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'lens[ray]' "
                                        "(CI installs it, so these tests run there)")

from lens.config import RunConfig  # noqa: E402
from lens.resume import SUPERSEDED, complete_result  # noqa: E402
from lens.rundir import RunDir  # noqa: E402
from lens.run import main  # noqa: E402
from lens.sweep import SUMMARY_COLUMNS, run_sweep  # noqa: E402
from lens.testing import REPO, reproducible  # noqa: E402
from lens.writers import read_csv_rows  # noqa: E402

TINY = ["tests/models/tiny-gpt2", "tests/models/tiny-llama"]
BAD = "bad/nonexistent-id"


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray instance with 2 CPUs for the session; its nodes are offline (no hub)."""
    hf_home = str(tmp_path_factory.mktemp("hf"))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "HF_HOME": hf_home}})
    yield hf_home
    ray.shutdown()


@pytest.fixture
def offline(ray_cluster, monkeypatch):
    """The driver offline too, like the cluster, and in the repository root."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", ray_cluster)
    monkeypatch.chdir(REPO)


def _summary(out: Path, name: str = "summary.csv") -> list[dict[str, str]]:
    header, *rows = read_csv_rows((out / name).read_bytes())
    assert tuple(header) == SUMMARY_COLUMNS
    return [dict(zip(header, r, strict=True)) for r in rows]


def _visible(out: Path) -> dict[str, bytes]:
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "staging left behind"
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _sweep(out: Path, models: list[str], *, resume: bool = False, on_started=None) -> tuple[int, str]:
    out.mkdir(exist_ok=True)
    err = io.StringIO()
    with RunDir.open(out) as run, contextlib.redirect_stderr(err):
        status = run_sweep(models, RunConfig(), run, quiet=False, launcher="ray", resume=resume,
                           on_started=on_started)
    return status, err.getvalue()


def test_ray_sweep_writes_the_bytes_of_the_local_sweep(offline, tmp_path, capsys):
    """Two tiny models and a bad id: the same files as --launcher local, a record, exit 1."""
    args = [*TINY, BAD, "--quiet", "--dtype", "float64"]  # float64: the same at any thread count
    assert main([*args, "--out_dir", str(tmp_path / "local")]) == 1
    assert main([*args, "--out_dir", str(tmp_path / "ray"), "--launcher", "ray"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lens:")]
    assert len(err) == 2 and all(BAD in line and "hub is unreachable" in line for line in err)
    local, on_ray = _visible(tmp_path / "local"), _visible(tmp_path / "ray")
    assert sorted(local) == sorted(on_ray)
    for name in ("tiny-gpt2", "tiny-llama"):
        assert f"output-{name}.json" in on_ray and f"output-{name}-timings.json" in on_ray
    assert "output-nonexistent-id.json" not in on_ray
    differ = [n for n in reproducible(local) if local[n] != on_ray[n]]
    assert differ == ["summary.csv", "summary.md"]  # the seconds column only
    record = json.loads(on_ray["output-nonexistent-id.error.json"])
    assert record["stage"] == "resolve" and record["error_class"] == "LensError"
    rows_local, rows_ray = _summary(tmp_path / "local"), _summary(tmp_path / "ray")
    assert [r["status"] for r in rows_ray] == ["ok", "ok", "failed"]
    for a, b in zip(rows_local, rows_ray, strict=True):
        assert {**a, "seconds": None} == {**b, "seconds": None} and float(b["seconds"]) > 0
    assert on_ray["sweep-trajectories.png"].startswith(b"\x89PNG")


def test_a_task_killed_mid_run_gets_its_record_and_the_others_complete(offline, tmp_path):
    started: dict[str, dict] = {}

    def kill_llama(model, where):
        started[model] = dict(where)
        if model.endswith("tiny-llama"):
            os.kill(where["pid"], signal.SIGKILL)

    status, err = _sweep(tmp_path / "out", TINY, on_started=kill_llama)
    assert status == 1
    assert sorted(started) == TINY and all(w["pid"] != os.getpid() for w in started.values())
    files = _visible(tmp_path / "out")
    record = json.loads(files["output-tiny-llama.error.json"])
    assert record["model"] == TINY[1] and record["stage"] == "crash"
    assert record["error_class"] == "WorkerCrashedError" and "died" in record["message"]
    assert [n for n in files if "tiny-llama" in n] == ["output-tiny-llama.error.json"]
    with RunDir.open(tmp_path / "out") as out:
        assert complete_result(out, TINY[0]) is not None
    assert [r["status"] for r in _summary(tmp_path / "out")] == ["ok", "failed"]
    assert "WorkerCrashedError" in files["summary.md"].decode()
    assert f"lens: error: {TINY[1]}: failed at crash" in err
    progress = [line for line in err.splitlines() if line.startswith("lens: [")]
    assert progress[0].startswith("lens: [0/2] running: tests/models/tiny-")
    assert progress[-1] == "lens: [2/2] running: -" and len(progress) == 4


def test_resume_after_an_interrupted_ray_sweep_runs_only_what_is_missing(offline, tmp_path,
                                                                         monkeypatch):
    """Ctrl-C once tiny-gpt2 is done while tiny-llama is (frozen) mid-run; then --resume."""
    import lens.launch.ray_launcher as launcher

    monkeypatch.setattr(launcher, "CANCEL_GRACE", 5.0)
    out = tmp_path / "out"
    frozen: list[int] = []

    def freeze_llama(model, where):
        if model.endswith("tiny-llama"):
            os.kill(where["pid"], signal.SIGSTOP)
            frozen.append(where["pid"])

    def press_ctrl_c_when_gpt2_is_done():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
                if frozen and _summary(out)[0]["status"] == "ok":
                    break
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1.0)
        for pid in frozen:  # let it see the cancellation
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    presser = threading.Thread(target=press_ctrl_c_when_gpt2_is_done, daemon=True)
    out.mkdir()
    presser.start()
    status, err = _sweep(out, TINY, on_started=freeze_llama)
    presser.join()
    assert status == 130 and f"lens: interrupted: {TINY[1]}" in err
    assert [r["status"] for r in _summary(out)] == ["ok", "interrupted"]
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()
              if "tiny-gpt2" in p.name}
    record = json.loads((out / "output-tiny-llama.error.json").read_bytes())
    assert record["stage"] == "interrupted" and record["error_class"] == "TaskCancelledError"

    ran: list[str] = []
    status, err = _sweep(out, TINY, resume=True, on_started=lambda model, _: ran.append(model))
    assert status == 0 and ran == [TINY[1]]
    assert "resume: 1 of 2 models complete, running 1; earlier files moved to superseded/1/" in err
    assert "lens: [1/2] running: tests/models/tiny-llama" in err
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()
            if "tiny-gpt2" in p.name} == before
    assert json.loads((out / SUPERSEDED / "1" / "output-tiny-llama.error.json").read_bytes()) == record
    assert not (out / "output-tiny-llama.error.json").exists()
    with RunDir.open(out) as run:
        assert all(complete_result(run, m) is not None for m in TINY)
    assert [r["status"] for r in _summary(out, "summary-2.csv")] == ["ok", "ok"]
    assert (out / "summary.csv").exists() and (out / "sweep-trajectories-2.png").exists()
