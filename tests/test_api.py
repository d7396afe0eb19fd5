"""The public Python API: exactly ``__all__``, light to import, and the README example runs."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys

import pytest

import lens
from lens.config import RunConfig
from lens.emitters import NextTokenRecord, PositionRecord, record_values
from lens.testing import REPO, reproducible


def test_all_is_exactly_the_public_names():
    assert len(lens.__all__) == len(set(lens.__all__))
    assert set(lens.__all__) == {"__version__", *lens._HOME}
    assert sorted(dir(lens)) == sorted(lens.__all__)
    for name in lens.__all__:
        assert getattr(lens, name) is not None
    namespace: dict[str, object] = {}
    exec("from lens import *", namespace)
    assert set(lens.__all__) <= set(namespace)
    with pytest.raises(AttributeError):
        _ = lens.not_a_public_name


def test_import_lens_does_not_load_torch():
    code = "import sys, lens; print('torch' in sys.modules, lens.RunConfig.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False", "RunConfig"]


def test_to_pandas_has_a_column_per_field_and_a_row_per_record(tiny_models):
    run = lens.run_probe(tiny_models["tiny-llama"], config=RunConfig(dtype="float64"))
    pure = [r for r in run.records if isinstance(r, NextTokenRecord)]
    frame = lens.to_pandas(run.records, lens.NextTokenRecord)
    assert list(frame.columns) == list(record_values(pure[0]))
    as_values = frame.astype(object).where(frame.notna(), None)  # pandas' NaN for a None
    assert as_values.to_dict("records") == [record_values(r) for r in pure]
    with pytest.raises(ValueError, match="PositionRecord"):
        lens.to_pandas(run.records)
    empty = lens.to_pandas([], PositionRecord)
    assert empty.empty and "topk" in empty.columns


def test_write_outputs_writes_what_the_cli_writes(run_lens, tmp_path):
    status, cli_files, _ = run_lens("tests/models/tiny-gpt2", "--dtype", "float64", "--no-plots")
    assert status == 0
    with contextlib.chdir(REPO):
        model = lens.load_model("tests/models/tiny-gpt2", device="cpu", dtype="float64")
    config = RunConfig(dtype="float64")
    paths = lens.write_outputs(lens.run_probe(model, "default", config), tmp_path / "api",
                               config=config, plots=False)
    api_files = {p.name: p.read_bytes() for p in paths}
    assert api_files == reproducible(cli_files)
    with pytest.raises(lens.LensError, match="exists from an earlier run"):
        lens.write_outputs(lens.run_probe(model, config=config), tmp_path / "api", config=config)


def _readme_example() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section has one example"
    return blocks[0]


def test_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(_readme_example(), "README.md:Python API", "exec"), namespace)
    model, orig, paths = namespace["model"], namespace["orig"], namespace["paths"]
    assert len(orig) == model.n_layers + 1 and list(orig.layer) == list(range(model.n_layers + 1))
    assert "L_semantic =" in capsys.readouterr().out
    written = sorted(p.name for p in (tmp_path / "lens-notebook-run").iterdir())
    assert written == sorted(p.name for p in paths)
    assert "output-SmolLM2-135M-Instruct.json" in written
