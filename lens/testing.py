"""The lens pytest plugin: tiny models, a run helper and byte-exact golden files.

Load it with ``pytest_plugins = ["lens.testing"]`` (the project's root
``conftest.py`` does). Users of lens can load the same plugin to pin their own
probes with goldens.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from syrupy.extensions.single_file import SingleFileSnapshotExtension, WriteMode

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "golden"
MODELS = REPO / "tests" / "models"
TINY_MODELS = ("tiny-gpt2", "tiny-llama")

settings.register_profile("ci", derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class GoldenBytes(SingleFileSnapshotExtension):
    """A golden file holding the exact bytes a run wrote (no newline translation)."""

    _write_mode = WriteMode.BINARY

    @classmethod
    def dirname(cls, *, test_location) -> str:  # type: ignore[no-untyped-def,override]
        return str(GOLDEN / test_location.basename)


class GoldenCSV(GoldenBytes):
    file_extension = "csv"


class GoldenJSON(GoldenBytes):
    file_extension = "json"


@pytest.fixture
def golden_csv(snapshot):  # type: ignore[no-untyped-def]
    """Snapshot that stores bytes under ``golden/<test module>/<test name>.csv``."""
    return snapshot.use_extension(GoldenCSV)


@pytest.fixture
def golden_json(snapshot):  # type: ignore[no-untyped-def]
    """Snapshot that stores bytes under ``golden/<test module>/<test name>.json``."""
    return snapshot.use_extension(GoldenJSON)


@pytest.fixture(scope="session")
def tiny_model_ids() -> tuple[str, ...]:
    """Model ids of the committed tiny models, relative to the repository root.

    Read-only: tests must not modify the directories behind them.
    """
    return tuple(f"tests/models/{name}" for name in TINY_MODELS)


@pytest.fixture(scope="session")
def tiny_models():  # type: ignore[no-untyped-def]
    """Loaded tiny models in float64 on the CPU, by name (read-only, shared by the session)."""
    from lens.model import load_model

    with contextlib.chdir(REPO):
        return {name: load_model(f"tests/models/{name}", device="cpu", dtype="float64")
                for name in TINY_MODELS}


@pytest.fixture
def run_lens(tmp_path: Path) -> Callable[..., tuple[int, dict[str, bytes], str]]:
    """Run the CLI in-process from the repository root; returns (status, files, stderr).

    ``files`` maps each written file name to its bytes; the output directory is
    a fresh temporary one unless ``--out_dir`` is among the arguments.
    """
    from lens.run import main

    def run(*argv: str, out_dir: Path | None = None) -> tuple[int, dict[str, bytes], str]:
        out = out_dir or tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        args: Sequence[str] = [*argv, "--out_dir", str(out), "--quiet"]
        err = io.StringIO()
        with contextlib.chdir(REPO), contextlib.redirect_stderr(err):
            status = main(args)
        files = {p.name: p.read_bytes() for p in sorted(out.iterdir())} if out.is_dir() else {}
        return status, files, err.getvalue()

    return run


def reproducible(files: dict[str, bytes]) -> dict[str, bytes]:
    """The files a second run must write byte for byte: all but the wall-clock timings."""
    return {n: data for n, data in files.items() if not n.endswith("-timings.json")}


@pytest.fixture
def in_tmp_cwd(tmp_path: Path) -> Iterator[Path]:
    """Run the test with the current directory set to a fresh temporary one."""
    with contextlib.chdir(tmp_path):
        yield tmp_path
