"""``--quiet`` means errors only: library warnings and logs are silenced for the run.

transformers, TransformerLens, matplotlib and torch report through Python's
``warnings`` and ``logging``; with ``--quiet`` both are raised to errors for
the duration of the run. OpenMP runtimes (libgomp) print from C straight to
the process's stderr, before Python can intervene, when they find settings
they do not accept; lens therefore never sets or passes on such variables.
lens's own warnings (``lens: warning: …``, e.g. non-finite values) still print:
they describe the results.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

LIBRARY_LOGGERS = ("transformers", "transformer_lens", "matplotlib", "torch", "huggingface_hub",
                   "accelerate", "PIL", "safetensors", "gguf")


@contextlib.contextmanager
def libraries_quiet(quiet: bool) -> Iterator[None]:
    """With ``quiet``, only errors from libraries reach stderr within the block."""
    if not quiet:
        yield
        return
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
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
