"""The benchmark script runs end to end (a smoke test, not a timing test)."""

from __future__ import annotations

import json
import subprocess
import sys

from lens.testing import REPO


def test_benchmark_runs_on_a_tiny_model(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench.py", "--model", "tests/models/tiny-gpt2", "--reps", "1",
         "--load-reps", "1", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ratio b/a = " in proc.stdout
    assert "peak memory beyond the loaded model" in proc.stdout
    assert f"lens from {REPO / 'lens'}" in proc.stdout
    result = json.loads(out.read_text())
    assert result["ratio"] > 0 and len(result["floor"]) == len(result["full"]) == 1
    assert result["load"]["fresh"][0]["load"] > 0
