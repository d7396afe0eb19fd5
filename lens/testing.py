"""The lens pytest plugin: tiny models, a run helper and byte-exact golden files.

Load it with ``pytest_plugins = ["lens.testing"]`` in a ``conftest.py`` (lens's
own root ``conftest.py`` does). Users of lens load the same plugin to pin their
own probes with goldens: ``golden_csv``/``golden_json`` files live under the
golden root of the project that runs pytest — the ini option
``lens_golden_dir`` (default ``golden``, relative to pytest's rootdir) — at
``<root>/<test module>/<test name>.csv``, never under the installed lens, so a
user's ``pytest --snapshot-update`` touches only their own goldens.

Hypothesis profiles ``ci`` (derandomised, no deadline) and ``dev`` (no
deadline) are registered when pytest configures the session; ``ci`` is loaded
unless ``$HYPOTHESIS_PROFILE`` or ``--hypothesis-profile`` names another.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from syrupy.extensions.single_file import SingleFileSnapshotExtension, WriteMode

REPO = Path(__file__).resolve().parents[1]
"""lens's own checkout: the tiny models live here (only in a checkout, not in a wheel)."""
MODELS = REPO / "tests" / "models"
TINY_MODELS = ("tiny-gpt2", "tiny-llama")
GOLDEN_DIR_OPTION = "lens_golden_dir"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(GOLDEN_DIR_OPTION, "where golden_csv/golden_json files live, relative to "
                  "pytest's rootdir (default: golden)", default="golden")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Register the hypothesis profiles and set the golden root from this project."""
    from hypothesis import HealthCheck, settings

    settings.register_profile("ci", derandomize=True, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("dev", deadline=None)
    if not config.getoption("hypothesis_profile", None):
        settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
    GoldenBytes.root = config.rootpath / config.getini(GOLDEN_DIR_OPTION)


class GoldenBytes(SingleFileSnapshotExtension):
    """A golden file holding the exact bytes a run wrote (no newline translation)."""

    _write_mode = WriteMode.BINARY
    root: Path = Path("golden")
    """Set per session from the project running pytest (``lens_golden_dir``)."""

    @classmethod
    def dirname(cls, *, test_location) -> str:  # type: ignore[no-untyped-def,override]
        return str(cls.root / test_location.basename)


class GoldenCSV(GoldenBytes):
    file_extension = "csv"


class GoldenJSON(GoldenBytes):
    file_extension = "json"


@pytest.fixture
def golden_csv(snapshot):  # type: ignore[no-untyped-def]
    """Snapshot that stores bytes under ``<golden root>/<test module>/<test name>.csv``."""
    return snapshot.use_extension(GoldenCSV)


@pytest.fixture
def golden_json(snapshot):  # type: ignore[no-untyped-def]
    """Snapshot that stores bytes under ``<golden root>/<test module>/<test name>.json``."""
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
def run_lens(tmp_path: Path,
             pytestconfig: pytest.Config) -> Callable[..., tuple[int, dict[str, bytes], str]]:
    """Run the CLI in-process from pytest's rootdir; returns (status, files, stderr).

    ``files`` maps each written file name to its bytes; the output directory is
    a fresh temporary one unless ``--out_dir`` is among the arguments.
    """
    from lens.run import main

    def run(*argv: str, out_dir: Path | None = None) -> tuple[int, dict[str, bytes], str]:
        out = out_dir or tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        args: Sequence[str] = [*argv, "--out_dir", str(out), "--quiet"]
        err = io.StringIO()
        with contextlib.chdir(pytestconfig.rootpath), contextlib.redirect_stderr(err):
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
