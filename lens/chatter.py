"""``--quiet`` means errors only: library warnings and logs are silenced for the run.

transformers, TransformerLens, matplotlib and torch report through Python's
``warnings`` and ``logging``; with ``--quiet`` both are raised to errors for
the duration of the run. OpenMP runtimes (libgomp) print from C straight to
the process's stderr when they are loaded and find settings they do not accept
(``OMP_NUM_THREADS=abc``); with ``--quiet`` the modules that load them are
imported with the process's stderr caught, and every line of it except the
runtime's own ``libgomp:``/``OMP:`` chatter is passed on.
lens's own warnings about the results (``lens: warning: …``, e.g. non-finite
values) still print; the ``lens`` logger (a fitted lens used with ``on``
despite its verdict) is silenced like a library's.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator

LIBRARY_LOGGERS = ("transformers", "transformer_lens", "matplotlib", "torch", "huggingface_hub",
                   "accelerate", "PIL", "safetensors", "gguf")

OPENMP_PREFIXES = ("libgomp:", "OMP:")
OPENMP_MODULES = ("torch", "sentencepiece")
"""Modules that load an OpenMP runtime of their own (sentencepiece vendors a libgomp)."""


@contextlib.contextmanager
def libraries_quiet(quiet: bool) -> Iterator[None]:
    """With ``quiet``, only errors from libraries reach stderr within the block."""
    if not quiet:
        yield
        return
    for module in OPENMP_MODULES:
        with contextlib.suppress(ImportError):
            _import_filtered(module)
    loggers = [logging.getLogger(name) for name in (*LIBRARY_LOGGERS, "lens")]
    levels = [lg.level for lg in loggers]
    env = {"TRANSFORMERS_VERBOSITY": os.environ.get("TRANSFORMERS_VERBOSITY")}
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _import_filtered(module: str) -> None:
    """Import ``module`` with file descriptor 2 caught; pass on all but OpenMP's notices."""
    if module in sys.modules:
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        importlib.import_module(module)
        return
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            importlib.import_module(module)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        caught.seek(0)
        text = caught.read().decode("utf-8", errors="replace")
    for line in text.splitlines():
        if line.strip() and not line.startswith(OPENMP_PREFIXES):
            print(line, file=sys.stderr)
