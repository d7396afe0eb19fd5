"""Fault fixtures about models: broken checkpoints, long and relative names, the embedded cache."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from faultkit import Run, run_main
from lens.testing import MODELS

LONG = 230
"""Characters of a long but legal directory name (NAME_MAX is 255 bytes)."""


def broken_model(tmp: Path, *, base: str = "tiny-gpt2",
                 config: Callable[[dict], None] | None = None,
                 weights: Callable[[dict], None] | None = None, name: str = "model") -> Path:
    """A copy of a tiny model with its config and/or weights edited."""
    target = tmp / name
    shutil.copytree(MODELS / base, target)
    if config is not None:
        raw = json.loads((target / "config.json").read_text())
        config(raw)
        (target / "config.json").write_text(json.dumps(raw))
    if weights is not None:
        tensors = load_file(target / "model.safetensors")
        weights(tensors)
        save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def _fill_nan(tensors: dict, part: str = "") -> None:
    for key, value in tensors.items():
        if part in key:
            value.fill_(float("nan"))


def _one_nan(tensors: dict, part: str) -> None:
    tensors[next(k for k in tensors if part in k)].view(-1)[0] = float("nan")


def _cut_embedding(tensors: dict) -> None:
    key = next(k for k in tensors if "wte" in k)
    tensors[key] = tensors[key][:50].clone()


INVALID_MODELS: dict[str, Callable[[Path], Path]] = {
    "no-layers": lambda t: broken_model(t, config=lambda c: c.update(n_layer=0)),
    "tokenizer-beyond-embedding": lambda t: broken_model(
        t, config=lambda c: c.update(vocab_size=50), weights=_cut_embedding),
    "all-nan-weights": lambda t: broken_model(t, weights=_fill_nan),
    "nan-in-final-norm": lambda t: broken_model(t, weights=lambda w: _one_nan(w, "ln_f.weight")),
    "config-validation-reason": lambda t: broken_model(
        t, base="tiny-llama", config=lambda c: c.update(num_hidden_layers="four")),
}


def long_model(tmp: Path, tail: str = "m") -> list[str]:
    return [str(broken_model(tmp, name="x" * (LONG - len(tail)) + tail))]


def check_long_name(run: Run) -> None:
    from lens.outputs import MAX_STEM, output_name

    model = next(iter(p for p in run.tmp.iterdir() if p.name.startswith("xxx")))
    name = output_name(str(model))
    assert len(name.encode()) <= MAX_STEM and name != model.name
    assert all(len(n.encode()) <= 255 for n in run.files)
    report = json.loads(run.files[f"output-{name}.json"])
    assert report["diagnostics"]["model"] == str(model)  # the full id stays inside


def check_long_record(run: Run) -> None:
    records = [n for n in run.files if n.endswith(".error.json")]
    assert len(records) == 1 and len(records[0].encode()) <= 255
    assert json.loads(run.files[records[0]])["model"].endswith("y" * 200)


def long_names_unique(tmp: Path, monkeypatch: pytest.MonkeyPatch, quiet: bool) -> Run:
    """Two long names that differ only in their last character: each gets its own record."""
    from lens.config import RunConfig, default_probe
    from lens.rundir import prepare_out_dir
    from lens.runmodel import run_one
    from lens.sweep import model_list

    models, _ = model_list(["./" + "y" * 240 + "1", "./" + "y" * 240 + "2"], default="unused")
    with prepare_out_dir(tmp / "out") as out:
        results = [run_one(m, RunConfig(), out, default_probe(), quiet=quiet) for m in models]
    return Run(0 if all(r.stage == "resolve" for r in results) else 1, "", tmp / "out", tmp)


def check_two_records(run: Run) -> None:
    records = sorted(n for n in run.files if n.endswith(".error.json"))
    assert len(records) == 2 and all(len(n.encode()) <= 255 for n in records), records
    assert sorted(json.loads(run.files[n])["model"][-1] for n in records) == ["1", "2"]


def model_at_dot(tmp: Path, monkeypatch: pytest.MonkeyPatch, quiet: bool) -> Run:
    """``python -m lens.run .`` inside the model's directory."""
    model = broken_model(tmp, name="tiny-gpt2")
    monkeypatch.chdir(model)
    return run_main(tmp, ["."], quiet=quiet)


def check_named_after_directory(run: Run) -> None:
    assert "output-tiny-gpt2.json" in run.files, sorted(run.files)
    assert not [n for n in run.files if n.startswith("output-.")]


# ---------------------------------------------------------------- the embedded model's cache


def fake_embedded(tmp: Path, monkeypatch: pytest.MonkeyPatch, *, gguf_name: str = "a") -> Path:
    """The embedded model with a small fake GGUF, built (fast) from tiny-llama's files."""
    import lens.embedded

    gguf = tmp / gguf_name / "fake.gguf"
    gguf.parent.mkdir(exist_ok=True)
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 64)

    def build(source: Path, dest: Path) -> None:
        with (tmp / "builds.txt").open("a") as log:
            log.write(f"{source}\n")
        for file in (MODELS / "tiny-llama").iterdir():
            shutil.copyfile(file, dest / file.name)

    monkeypatch.setattr(lens.embedded, "_build", build)
    monkeypatch.setattr(lens.embedded, "gguf_path", lambda: gguf)
    monkeypatch.setenv("LENS_CACHE_DIR", str(tmp / "cache"))
    return gguf


def builds(run: Run) -> int:
    log = run.tmp / "builds.txt"
    return len(log.read_text().splitlines()) if log.exists() else 0


def second_install(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A first install built the cache; this one has the same GGUF elsewhere, newer."""
    import lens.embedded

    first = fake_embedded(tmp, monkeypatch)
    lens.embedded.embedded_model_dir()
    second = fake_embedded(tmp, monkeypatch, gguf_name="b")
    os.utime(second, ns=(first.stat().st_mtime_ns + 10**9,) * 2)


def damaged_cache(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lens.embedded

    fake_embedded(tmp, monkeypatch)
    weights = lens.embedded.embedded_model_dir() / "model.safetensors"
    weights.write_bytes(b"\xff" * weights.stat().st_size)


def unwritable_cache(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_embedded(tmp, monkeypatch)
    (tmp / "file").write_text("x")
    monkeypatch.setenv("LENS_CACHE_DIR", str(tmp / "file" / "cache"))


def check_builds(n: int, *, named: bool = False) -> Callable[[Run], None]:
    def check(run: Run) -> None:
        assert builds(run) == n
        assert "output-SmolLM2-135M-Instruct.json" in run.files
        if named:
            assert f"cached embedded model at {run.tmp / 'cache'}" in run.err
    return check
