"""Sweeps: model lists, a worker process per model, failure records, the summary, Ctrl-C."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from lens.config import RunConfig, default_probe
from lens.errors import LensError
from lens.rundir import RunDir
from lens.run import main
from lens.sweep import PRESETS, SUMMARY_COLUMNS, model_list, read_models_file, run_sweep, worker_argv
from lens.worker import run_one
from lens.testing import REPO, reproducible
from lens.writers import read_csv_dicts, read_csv_rows

ERROR_KEYS = ["model", "stage", "error_class", "message"]


def _summary(out: Path) -> list[dict[str, str]]:
    data = (out / "summary.csv").read_bytes()
    assert tuple(read_csv_rows(data)[0]) == SUMMARY_COLUMNS
    return read_csv_dicts(data)


def _visible(out: Path) -> dict[str, bytes]:
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "staging left behind"
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


# ---------------------------------------------------------------- model lists


def test_models_file_and_preset(tmp_path):
    listing = tmp_path / "models.txt"
    listing.write_text(textwrap.dedent("""\
        # the models of my study
        tests/models/tiny-gpt2

          org/model-a   # trailing comment
        ./dir#with-hash
    """))
    assert read_models_file(listing) == ["tests/models/tiny-gpt2", "org/model-a", "./dir#with-hash"]
    models, is_sweep = model_list(["x/first"], models_file=listing, preset="baseline10", default="d")
    assert models[:4] == ["x/first", "tests/models/tiny-gpt2", "org/model-a", "./dir#with-hash"]
    assert models[4:] == list(PRESETS["baseline10"]) and len(PRESETS["baseline10"]) == 10
    assert is_sweep
    assert model_list([], default="d") == (["d"], False)
    assert model_list(["a/m"], default="d") == (["a/m"], False)
    assert model_list(["a/m", "b/n"], default="d")[1]


@pytest.mark.parametrize("content, expected", [
    ("# nothing\n\n", "lists no models"),
    (None, "cannot read --models-file"),
])
def test_bad_models_file(tmp_path, content, expected):
    listing = tmp_path / "models.txt"
    if content is not None:
        listing.write_text(content)
    with pytest.raises(LensError, match=expected):
        read_models_file(listing)


def test_same_output_name_twice_is_refused(capsys, tmp_path):
    assert main(["a/model", "b/model", "--out_dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output-model" in err[0]
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


# ---------------------------------------------------------------- the sweep end to end


def test_sweep_survives_a_bad_model(run_lens, tmp_path, monkeypatch, capsys):
    """Two tiny models and a bad id: complete, identical outputs, a failure record, exit 1."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "sweep"
    models = ["tests/models/tiny-gpt2", "tests/models/tiny-llama", "bad/nonexistent-id"]
    monkeypatch.chdir(REPO)
    status = main([*models, "--out_dir", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert status == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "bad/nonexistent-id" in lines[0] and "hub is unreachable" in lines[0]
    files = _visible(out)

    for name in ("tiny-gpt2", "tiny-llama"):
        single_status, single, _ = run_lens(f"tests/models/{name}")
        assert single_status == 0
        assert reproducible(single) == reproducible({n: b for n, b in files.items() if name in n})
        assert f"output-{name}-timings.json" in files

    assert not [n for n in files if "nonexistent-id" in n and not n.endswith(".error.json")]
    record = json.loads(files["output-nonexistent-id.error.json"])
    assert list(record) == ERROR_KEYS
    assert record["model"] == "bad/nonexistent-id" and record["stage"] == "resolve"
    assert record["error_class"] == "LensError" and "hub is unreachable" in record["message"]

    rows = _summary(out)
    assert [(r["model"], r["status"]) for r in rows] == [
        ("tests/models/tiny-gpt2", "ok"), ("tests/models/tiny-llama", "ok"),
        ("bad/nonexistent-id", "failed")]
    for row in rows[:2]:
        name = row["model"].rsplit("/", 1)[-1]
        report = json.loads(files[f"output-{name}.json"])
        diag = report["diagnostics"]
        assert row["n_layers"] == "4" == str(report["model_stats"]["num_layers"])
        assert row["lens_artifact_risk"] == diag["raw_lens_check"]["summary"]["lens_artifact_risk"]
        assert row["first_kl_below_1.0"] == str(diag["first_kl_below_1.0"])
        assert float(row["last_layer_kl_bits"]) == pytest.approx(
            diag["last_layer_consistency"]["kl_to_final_bits"], abs=1e-9)
        assert float(row["max_control_margin"]) == pytest.approx(
            report["control_summary"]["max_control_margin"], rel=1e-9)
        assert float(row["seconds"]) > 0
    assert all(v == "" for k, v in rows[2].items() if k not in ("model", "status", "seconds"))
    md = files["summary.md"].decode()
    assert md.count("| tests/models/tiny-") == 2 and "| bad/nonexistent-id | failed |" in md
    assert "output-nonexistent-id.error.json" in md
    assert files["sweep-trajectories.png"].startswith(b"\x89PNG\r\n\x1a\n")


# ---------------------------------------------------------------- fake workers


def _fake_argv(scripts: Mapping[str, str]):
    """Worker command lines that run ``scripts[model]`` (with ``job`` and ``os`` at hand)."""
    def argv(job: Mapping[str, Any]) -> list[str]:
        if job["model"] not in scripts:
            return worker_argv(job)
        prelude = "import json, os, sys, time, signal\njob = json.loads(sys.argv[1])\n"
        return [sys.executable, "-c", prelude + textwrap.dedent(scripts[job["model"]]),
                json.dumps(job)]
    return argv


WRITE = """
def write(name, data):
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666, dir_fd=job["out_fd"])
    os.write(fd, data)
    os.close(fd)
"""
REPORT = {"diagnostics": {"L_semantic": 3, "L_copy": 1}, "model_stats": {"num_layers": 6}}


def _sweep(tmp_path: Path, models: list[str], scripts: Mapping[str, str],
           on_start: Mapping[str, Any] = {}) -> tuple[int, Path, str]:  # noqa: B006
    out = tmp_path / "out"
    out.mkdir()
    err = io.StringIO()
    fake = _fake_argv(scripts)

    def argv(job: Mapping[str, Any]) -> list[str]:
        if job["model"] in on_start:
            on_start[job["model"]]()
        return fake(job)

    with RunDir.open(out) as run, contextlib.redirect_stderr(err):
        status = run_sweep(models, RunConfig(), run, quiet=True, argv=argv)
    return status, out, err.getvalue()


def test_crashed_workers_get_records_and_no_partial_outputs(tmp_path):
    scripts = {
        "org/killed": "os.kill(os.getpid(), signal.SIGKILL)",
        "org/partial": WRITE + "write('output-partial-records.csv', b'half')\nsys.exit(3)",
        "org/late": WRITE + f"write('output-late.json', {json.dumps(REPORT).encode()!r})\n"
                            "os.kill(os.getpid(), signal.SIGKILL)",
        "org/fine": f"os.write(job['result_fd'], json.dumps({{'model': job['model'], "
                    f"'status': 'ok', 'summary': {{'n_layers': 2}}}}).encode())",
    }
    status, out, err = _sweep(tmp_path, list(scripts), scripts)
    assert status == 1
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "org/killed" in lines[0] and "SIGKILL" in lines[0]
    assert "org/partial" in lines[1] and "status 3" in lines[1]
    files = _visible(out)
    killed = json.loads(files["output-killed.error.json"])
    assert list(killed) == ERROR_KEYS and killed["stage"] == "crash"
    assert killed["error_class"] == "WorkerCrash" and "out of memory" in killed["message"]
    assert "output-partial-records.csv" not in files  # half-written output removed
    assert json.loads(files["output-partial.error.json"])["stage"] == "crash"
    assert "output-late.error.json" not in files  # it finished its outputs before dying
    rows = {r["model"]: r for r in _summary(out)}
    assert {m: r["status"] for m, r in rows.items()} == {
        "org/killed": "failed", "org/partial": "failed", "org/late": "ok", "org/fine": "ok"}
    assert rows["org/late"]["L_semantic_frac"] == "0.5" and rows["org/fine"]["n_layers"] == "2"


def test_ctrl_c_keeps_finished_models_and_lists_the_rest(tmp_path):
    """Ctrl-C while the second model runs: exit 130, summary ok / interrupted / not_run."""
    scripts = {
        "org/done": WRITE + f"write('output-done.json', {json.dumps(REPORT).encode()!r})\n"
                            "os.write(job['result_fd'], json.dumps({'model': job['model'], "
                            "'status': 'ok', 'summary': {}}).encode())",
        "org/slow": "time.sleep(60)",
        "org/never": "raise SystemExit('must not start')",
    }

    def ctrl_c(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, ctrl_c)
    press_soon = {"org/slow": lambda: signal.setitimer(signal.ITIMER_REAL, 1.0)}
    try:
        status, out, err = _sweep(tmp_path, list(scripts), scripts, on_start=press_soon)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert status == 130
    assert "interrupted: org/slow" in err
    files = _visible(out)
    assert "output-done.json" in files
    record = json.loads(files["output-slow.error.json"])
    assert record["stage"] == "interrupted" and record["error_class"] == "KeyboardInterrupt"
    assert [r["status"] for r in _summary(out)] == ["ok", "interrupted", "not_run"]
    assert "not_run" in files["summary.md"].decode()


def test_summary_never_replaces_an_earlier_one(tmp_path):
    scripts = {m: "sys.exit(1)" for m in ("org/a", "org/b")}
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.csv").write_text("earlier\n")
    with RunDir.open(out) as run, contextlib.redirect_stderr(io.StringIO()):
        run_sweep(["org/a", "org/b"], RunConfig(), run, quiet=True, argv=_fake_argv(scripts))
    assert (out / "summary.csv").read_text() == "earlier\n"
    assert (out / "summary-2.csv").exists() and (out / "summary-2.md").exists()


# ---------------------------------------------------------------- one model, in process


def test_interrupted_model_leaves_only_its_record(tmp_path, monkeypatch):
    import lens.report

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lens.report, "analyse", interrupt)
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["tests/models/tiny-llama", "--out_dir", str(out), "--quiet"])
    assert status == 130 and err.getvalue().strip() == "lens: interrupted"
    files = _visible(out)
    assert list(files) == ["output-tiny-llama.error.json"]
    record = json.loads(files["output-tiny-llama.error.json"])
    assert record == {"model": "tests/models/tiny-llama", "stage": "interrupted",
                      "error_class": "KeyboardInterrupt", "message": "interrupted during analyse"}


def test_a_bug_during_analysis_is_recorded_with_its_traceback(tmp_path, monkeypatch):
    import lens.report

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(lens.report, "output_files", broken)
    monkeypatch.chdir(REPO)
    with RunDir.open(tmp_path) as run:
        result = run_one("tests/models/tiny-gpt2", RunConfig(), run, default_probe(), quiet=True)
    assert result.status == "failed" and result.stage == "analyse"
    record = json.loads((tmp_path / "output-tiny-gpt2.error.json").read_bytes())
    assert record["error_class"] == "RuntimeError" and "out of memory" in record["message"]
    assert "Traceback" in record["traceback"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["output-tiny-gpt2.error.json"]


def test_model_that_fits_nowhere_is_skipped(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    nowhere = {"cuda": None, "mps": None, "cpu": 1e5}.get
    with RunDir.open(tmp_path) as run:
        result = run_one("tests/models/tiny-gpt2", RunConfig(), run, default_probe(), quiet=True,
                         free=nowhere)
    assert result.status == "skipped" and result.stage == "device"
    record = json.loads((tmp_path / "output-tiny-gpt2.error.json").read_bytes())
    assert record["stage"] == "device" and "fits on no device" in record["message"]
    assert "cpu needs" in record["message"]


def test_worker_gets_the_exact_config():
    from lens.worker import config_from_json, config_to_json

    config = RunConfig(copy_threshold=0.1 + 0.2, copy_margin=1 / 3, copy_window_k=3, raw_lens="full",
                       fp32_unembed=True, keep_residuals=True, prism="off",
                       prism_dir=Path("/x/prisms"), device_map='{"": "cpu"}', dtype="float64")
    assert config_from_json(json.loads(json.dumps(config_to_json(config)))) == config
