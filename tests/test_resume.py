"""``--resume DIR`` (local launcher), the Ray resource policy and the sweep-level progress line.

None of these needs Ray: the resume runs use the local launcher with stand-in workers.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from lens.config import RunConfig
from lens.launch.ray_resources import GiB, task_request, unplaceable
from lens.progress import SweepStatus
from lens.resume import SUPERSEDED, complete_result, csv_complete, models_of
from lens.run import main
from lens.rundir import RunDir
from lens.sweep import run_sweep
from lens.testing import REPO
from lens.writers import read_csv_rows

GPT2, LLAMA = "tests/models/tiny-gpt2", "tests/models/tiny-llama"


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory) -> Path:
    """A real sweep of the two tiny models (their complete outputs), made once."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    with contextlib.chdir(REPO), contextlib.redirect_stderr(io.StringIO()):
        assert main([GPT2, LLAMA, "--out_dir", str(out), "--quiet", "--no-plots"]) == 0
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _resume(out: Path, models: list[str]) -> tuple[int, list[str], str]:
    """Resume into ``out`` with stand-in workers that only note their model and fail."""
    ran: list[str] = []

    def argv(job):
        ran.append(job["model"])
        return [sys.executable, "-c", "raise SystemExit(3)"]

    err = io.StringIO()
    with RunDir.open(out) as run, contextlib.chdir(REPO), contextlib.redirect_stderr(err):
        status = run_sweep(models, RunConfig(), run, quiet=False, plots=False, argv=argv,
                           resume=True)
    return status, ran, err.getvalue()


def test_complete_outputs_are_kept_and_the_rest_runs_again(finished_sweep, tmp_path):
    out = _copy(finished_sweep, tmp_path / "out")
    records = out / "output-tiny-llama-records.csv"
    records.write_bytes(records.read_bytes()[:-200])  # cut short: incomplete
    (out / "output-ghost.error.json").write_text('{"model": "org/ghost"}')  # failed earlier
    gpt2_before = (out / "output-tiny-gpt2.json").stat().st_ino
    status, ran, err = _resume(out, [GPT2, LLAMA, "org/ghost"])
    assert status == 1 and ran == [LLAMA, "org/ghost"]
    assert "resume: 1 of 3 models complete, running 2" in err
    assert (out / "output-tiny-gpt2.json").stat().st_ino == gpt2_before
    aside = out / SUPERSEDED / "1"
    assert (aside / "output-ghost.error.json").read_text() == '{"model": "org/ghost"}'
    assert (aside / "output-tiny-llama-records.csv").exists()
    assert (aside / "output-tiny-llama.json").exists() and not (out / "output-tiny-llama.json").exists()
    assert json.loads((out / "output-tiny-llama.error.json").read_bytes())["stage"] == "crash"
    header, *rows = read_csv_rows((out / "summary-2.csv").read_bytes())
    assert [(r[0], r[1]) for r in rows] == [(GPT2, "ok"), (LLAMA, "failed"), ("org/ghost", "failed")]
    assert rows[0][2] == "4" and float(rows[0][-1]) > 0  # read back from the kept outputs
    assert (out / "summary.csv").exists()  # the earlier summary is never replaced

    status, ran, _ = _resume(out, [GPT2, LLAMA, "org/ghost"])  # again: a second folder
    assert ran == [LLAMA, "org/ghost"] and (out / SUPERSEDED / "2" / "output-ghost.error.json").exists()


def test_resume_takes_the_models_from_the_latest_summary(finished_sweep, tmp_path, capsys):
    out = _copy(finished_sweep, tmp_path / "out")
    with RunDir.open(out) as run:
        assert models_of(run) == [GPT2, LLAMA]
    with contextlib.chdir(REPO):
        assert main(["--resume", str(out), "--quiet", "--launcher", "local"]) == 0
    assert capsys.readouterr().err == ""
    header, *rows = read_csv_rows((out / "summary-2.csv").read_bytes())
    assert [(r[0], r[1]) for r in rows] == [(GPT2, "ok"), (LLAMA, "ok")]
    assert not (out / SUPERSEDED).exists()


@pytest.mark.parametrize("damage", ["other model", "no layer count", "truncated pure", "extra row"])
def test_outputs_that_fail_the_check_are_not_complete(finished_sweep, tmp_path, damage):
    out = _copy(finished_sweep, tmp_path / "out")
    report_path, pure = out / "output-tiny-gpt2.json", out / "output-tiny-gpt2-pure-next-token.csv"
    report = json.loads(report_path.read_bytes())
    with RunDir.open(out) as run:
        assert complete_result(run, GPT2).summary["n_layers"] == 4
    if damage == "other model":
        report["diagnostics"]["model"] = "org/tiny-gpt2"
    elif damage == "no layer count":
        del report["model_stats"]["num_layers"]
    elif damage == "truncated pure":
        pure.write_bytes(b"".join(pure.read_bytes().splitlines(keepends=True)[:-1]))
    else:
        lines = pure.read_bytes().splitlines(keepends=True)
        pure.write_bytes(b"".join([*lines, lines[-1]]))
    report_path.write_text(json.dumps(report))
    with RunDir.open(out) as run:
        assert complete_result(run, GPT2) is None
        assert complete_result(run, LLAMA) is not None


def test_csv_check_counts_one_row_per_layer():
    head = b"prompt_id,prompt_variant,layer,pos,x\n"
    whole = head + b"".join(b"pos,orig,%d,%d,1\n" % (layer, pos) for pos in (0, 1)
                            for layer in range(3))
    assert csv_complete(whole, 2)
    assert not csv_complete(whole, 3)  # a layer missing everywhere
    assert not csv_complete(whole[:-1], 2)  # no final newline: cut mid-row
    assert not csv_complete(whole.replace(b"pos,orig,2,1,1\n", b""), 2)
    assert not csv_complete(whole.replace(b"pos,orig,2,1,1\n", b"pos,orig,2,1\n"), 2)
    assert not csv_complete(head, 2)


def test_resume_refuses_a_missing_directory(tmp_path, capsys):
    assert main(["--resume", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such directory" in err[0]


def test_launcher_ray_without_ray_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    assert main([GPT2, LLAMA, "--launcher", "ray", "--out_dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lens: error: --launcher ray needs Ray, which is not installed; install it "
                   "with: pip install 'lens[ray]'"]
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- the Ray request policy


def test_task_request_follows_the_memory_rule():
    """fp16 weights · 1.2 against each GPU's memory less the 1 GiB reserve."""
    gpu = 80 * GiB
    per_gpu = gpu - 1 * GiB
    for n_params, gpus in ((7e9, 1), (34e9, 1), (70e9, 2), (72e9, 3)):
        expected = -(-int(n_params * 2 * 1.2) // per_gpu)  # ceil
        request = task_request("org/model", RunConfig(), n_params=int(n_params), gpu_bytes=gpu)
        assert request.num_gpus == expected == gpus
        assert request.memory == int(n_params) * 2  # fp16 weights through host memory
        assert request.config.n_devices == (gpus if gpus > 1 else None)
    gemma = task_request("google/gemma-2-27b", RunConfig(), n_params=27_000_000_000, gpu_bytes=gpu)
    assert gemma.num_gpus == 1 and gemma.memory == 27_000_000_000 * 2  # bf16
    cpu = task_request("org/model", RunConfig(device="cpu"), n_params=10**9, gpu_bytes=gpu)
    assert cpu.num_gpus == 0 and cpu.memory == math.ceil(10**9 * 4 * (1 + 0.2) + 2 * GiB)
    no_gpus = task_request("org/model", RunConfig(), n_params=10**9, gpu_bytes=None)
    assert no_gpus.num_gpus == 0 and no_gpus.options() == {
        "num_gpus": 0, "num_cpus": 1.0, "memory": no_gpus.memory}
    unknown = task_request("org/model", RunConfig(), n_params=None, gpu_bytes=gpu)
    assert unknown.num_gpus == 1 and unknown.memory is None
    pinned = task_request("org/model", RunConfig(n_devices=4), n_params=10**9, gpu_bytes=gpu)
    assert pinned.num_gpus == 4 and pinned.config.n_devices == 4


def test_a_request_no_node_can_hold_is_named():
    nodes = [{"Alive": True, "Resources": {"CPU": 16.0, "GPU": 2.0, "memory": 200 * GiB}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0, "memory": 900 * GiB}}]
    fits = task_request("org/model", RunConfig(), n_params=70 * 10**9, gpu_bytes=80 * GiB)
    too_big = task_request("org/model", RunConfig(), n_params=72 * 10**9, gpu_bytes=80 * GiB)
    assert unplaceable(fits, nodes) is None
    why = unplaceable(too_big, nodes)
    assert why is not None and "3 GPU(s)" in why and "largest nodes have 2 GPU(s)" in why


# ---------------------------------------------------------------- the progress line


def test_sweep_status_line():
    stream = io.StringIO()
    status = SweepStatus(3, done=1, stream=stream)
    status.started("org/a")
    status.started("org/b")
    status.finished("org/a")
    status.finished("org/b")
    assert stream.getvalue().splitlines() == [
        "lens: [1/3] running: org/a", "lens: [1/3] running: org/a, org/b",
        "lens: [2/3] running: org/b", "lens: [3/3] running: -"]
    quiet = io.StringIO()
    SweepStatus(2, quiet=True, stream=quiet).started("org/a")
    assert quiet.getvalue() == ""
