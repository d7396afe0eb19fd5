"""Where a model comes from: a local directory checked before loading, a cached or reachable hub id.

``resolve_source`` turns what the user passed into something ``from_pretrained``
can load, or one line that says what is missing and how to fix it, before any
weights are read. Kept apart from ``lens.model`` so that callers that only
need to find a model (the Ray launcher's resource estimate) do not import the
loading and capture code.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

from lens.errors import LensError

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def resolve_source(model_id: str) -> str:
    """A local directory to load from, or a hub id known to be reachable or cached."""
    from lens import embedded

    if embedded.is_embedded(model_id):
        return str(embedded.embedded_model_dir())
    path = Path(model_id).expanduser()
    if path.exists() or model_id.startswith((".", "/", "~")) or os.sep + os.sep in model_id:
        if not path.is_dir():
            raise LensError(f"model directory {model_id} does not exist; pass a local Hugging Face "
                            "directory, a hub id, or nothing for the embedded model")
        if not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
            raise LensError(f"no weights in {path} (expected model.safetensors or pytorch_model.bin); "
                            "point at a complete Hugging Face model directory")
        if not any((path / f).exists() for f in TOKENIZER_FILES):
            raise LensError(f"no tokenizer in {path} (expected tokenizer.json, tokenizer.model or "
                            "vocab.json); save the tokenizer with tokenizer.save_pretrained(dir)")
        if not (path / "config.json").exists():
            raise LensError(f"no config.json in {path}; save the model with model.save_pretrained(dir)")
        return str(path)
    from transformers import AutoConfig

    try:
        with quiet():
            AutoConfig.from_pretrained(model_id, local_files_only=True)
        return model_id
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise LensError(f"the Hugging Face hub is unreachable and {model_id!r} is not cached; "
                        "download it elsewhere and pass its local directory instead: "
                        "python -m lens.run /path/to/model")
    return model_id


@contextlib.contextmanager
def quiet():
    """Silence library chatter (progress bars, warnings) during loading."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()
