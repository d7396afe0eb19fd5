"""``lens.testing`` as a user loads it: in a project of their own, outside this repository."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lens.testing import REPO

USER_TEST = '''
def test_pinned_rows(golden_csv):
    assert golden_csv == b"layer,p\\n0,0.5\\n1,0.75\\n"
'''


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _pytest(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("HYPOTHESIS_PROFILE", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("ini,golden_root", [("", "golden"),
                                             ("lens_golden_dir = pins/lens\n", "pins/lens")])
def test_user_snapshot_update_writes_beside_the_user_project(tmp_path, ini, golden_root):
    project = tmp_path / "user-project"
    (project / "tests").mkdir(parents=True)
    (project / "pytest.ini").write_text(f"[pytest]\n{ini}")
    (project / "conftest.py").write_text('pytest_plugins = ["lens.testing"]\n')
    (project / "tests" / "test_mine.py").write_text(USER_TEST)
    assert not project.resolve().is_relative_to(REPO)
    before = _tree(REPO / "golden")

    update = _pytest(project, "--snapshot-update")
    assert update.returncode == 0, update.stdout + update.stderr
    golden = project / golden_root / "test_mine" / "test_pinned_rows.csv"
    assert golden.read_bytes() == b"layer,p\n0,0.5\n1,0.75\n"
    assert _tree(REPO / "golden") == before  # lens's own goldens: not one byte moved
    if ini:
        return

    assert _pytest(project).returncode == 0  # the pinned golden now passes
    golden.write_bytes(b"layer,p\n0,0.5\n1,0.7\n")
    stale = _pytest(project)
    assert stale.returncode == 1 and "test_pinned_rows" in stale.stdout
    assert _tree(REPO / "golden") == before
