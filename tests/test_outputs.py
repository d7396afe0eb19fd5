"""One owner for output names (lens.outputs); one path for a single model's run (lens.runmodel)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from lens import outputs
from lens.config import RunConfig, default_probe
from lens.outputs import MAX_STEM, fit, output_name, run_file_names
from lens.probe import load_probe
from lens.rundir import RunDir
from lens.testing import REPO

TINY_PROBE = Path(__file__).resolve().parent / "probes" / "tiny-multi.yaml"
LENS = REPO / "lens"


def test_a_multi_fact_run_writes_only_listed_files(run_lens):
    """Every file of a run with several facts, plots and residuals is in the list, and the
    per-fact heatmaps are among them."""
    probe = load_probe(TINY_PROBE)
    fact_ids = [f.id for f in probe.facts]
    status, files, err = run_lens("tests/models/tiny-gpt2", "--probe", str(TINY_PROBE),
                                  "--keep-residuals", "--device", "cpu")
    assert status == 0, err
    listed = run_file_names("tiny-gpt2", fact_ids=fact_ids)
    assert set(files) <= set(listed), sorted(set(files) - set(listed))
    heatmaps = {outputs.heatmap_file("tiny-gpt2", fid) for fid in fact_ids}
    assert heatmaps <= set(files) and heatmaps <= set(listed)
    assert listed[-1] == outputs.report_file("tiny-gpt2")


def test_only_outputs_spells_output_names():
    spelled = [p.name for p in LENS.rglob("*.py")
               if p.name != "outputs.py" and re.search(r"""["']output-|f["']output-""",
                                                         p.read_text(encoding="utf-8"))]
    assert spelled == []


@pytest.mark.parametrize(("model_id", "name"), [
    ("org/model", "model"), ("org/model/", "model"), ("tests/models/tiny-gpt2", "tiny-gpt2"),
    ("tests/models/tiny-gpt2/.", "tiny-gpt2"),
    ("./tests/models/../models/tiny-llama", "tiny-llama"),
    ("SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"),
])
def test_output_name(model_id, name, monkeypatch):
    monkeypatch.chdir(REPO)
    assert output_name(model_id) == name


def test_dot_is_named_after_the_directory(monkeypatch):
    monkeypatch.chdir(REPO / "tests" / "models" / "tiny-gpt2")
    assert output_name(".") == "tiny-gpt2"


def test_long_names_are_cut_with_a_hash_and_stay_unique():
    a, b = "org/" + "é" * 200 + "a", "org/" + "é" * 200 + "b"
    na, nb = output_name(a), output_name(b)
    assert na != nb and len(na.encode()) <= MAX_STEM and len(nb.encode()) <= MAX_STEM
    assert na.encode().decode() == na  # never a broken UTF-8 sequence
    longest = max((*run_file_names(na, fact_ids=["f" * 300, "g"]), outputs.error_file(na),
                   outputs.staging_name(na)), key=lambda n: len(n.encode()))
    assert len(longest.encode()) + len(".x.1234567.0123456789ab.new.1234567.0123456789ab.tmp") < 255
    assert fit("short", 10) == "short"


def test_a_single_model_run_never_enters_a_worker_module(tmp_path, monkeypatch):
    from lens.runmodel import run_one

    monkeypatch.chdir(REPO)
    with RunDir.open(tmp_path) as out:
        result = run_one("tests/models/tiny-gpt2", RunConfig(device="cpu"), out, default_probe(),
                         quiet=True, plots=False)
    assert result.ok
    assert not [m for m in sys.modules if m.startswith("lens") and "worker" in m]


def test_sweep_imports_nothing_from_a_worker_module():
    tree = ast.parse((LENS / "sweep.py").read_text(encoding="utf-8"))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and "worker" in m]


def test_produce_writes_nothing_and_deliver_writes_all(tmp_path, monkeypatch):
    from lens.runmodel import deliver, produce

    monkeypatch.chdir(REPO)
    produced = produce("tests/models/tiny-llama", RunConfig(device="cpu"), default_probe(),
                       quiet=True, plots=False)
    assert produced.result.ok and produced.name == "tiny-llama"
    assert list(tmp_path.iterdir()) == []
    with RunDir.open(tmp_path) as out:
        result = deliver(out, produced, quiet=True)
    assert result == produced.result
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == dict(produced.files)


def test_a_failed_produce_delivers_only_its_record(tmp_path):
    import json

    from lens.runmodel import deliver, produce

    produced = produce(str(tmp_path / "missing"), RunConfig(), default_probe(), quiet=True)
    assert produced.result.status == "failed" and produced.files == {}
    with RunDir.open(tmp_path) as out:
        deliver(out, produced, quiet=True)
    record = json.loads((tmp_path / "output-missing.error.json").read_bytes())
    assert record["stage"] == "resolve" and "does not exist" in record["message"]


def test_produce_gives_the_frozen_model_back_to_the_collector(monkeypatch):
    """produce freezes the loaded model for its run only: a process that goes on (a test
    session, an in-process caller) gets every object back to the collector."""
    import gc

    from lens.runmodel import produce

    monkeypatch.chdir(REPO)
    frozen_during = []
    import lens.report as report

    analyse = report.analyse

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        frozen_during.append(gc.get_freeze_count())
        return analyse(*args, **kwargs)

    monkeypatch.setattr(report, "analyse", spy)
    assert gc.get_freeze_count() == 0
    produced = produce("tests/models/tiny-llama", RunConfig(device="cpu"), default_probe(),
                       quiet=True, plots=False)
    assert produced.result.ok
    assert frozen_during and frozen_during[0] > 0
    assert gc.get_freeze_count() == 0
