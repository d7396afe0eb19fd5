"""The benchmark scripts run end to end (smoke tests, not timing tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lens.testing import REPO

TINY = ("--model", "tests/models/tiny-gpt2")


def _script(name: str, *args: str) -> str:
    """Run ``benchmarks/<name>`` as a process in the checkout; its stdout (it must exit 0)."""
    proc = subprocess.run([sys.executable, f"benchmarks/{name}", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_benchmark_runs_on_a_tiny_model(tmp_path):
    out = tmp_path / "bench.json"
    stdout = _script("bench.py", *TINY, "--reps", "1", "--load-reps", "1", "--json", str(out))
    assert "ratio b/a = " in stdout
    assert "peak memory beyond the loaded model" in stdout
    assert f"lens from {REPO / 'lens'}" in stdout
    result = json.loads(out.read_text())
    assert result["ratio"] > 0 and len(result["floor"]) == len(result["full"]) == 1
    assert result["load"]["fresh"][0]["load"] > 0


def test_whole_process_benchmark_runs_on_a_tiny_model(tmp_path):
    """benchmarks/whole.py runs lens.run and the floor script in pairs and reports their ratio."""
    out = tmp_path / "whole.json"
    stdout = _script("whole.py", "--pairs", "1", *TINY, "--device", "cpu", "--json", str(out))
    assert "ratio A/B median of pairs = " in stdout
    result = json.loads(out.read_text())
    assert len(result["ratios"]) == 1 and result["ratio"] > 0
    (_, timings), = result["runs"]
    assert timings["write"] > 0 and result["floors"][0][1]["decode"] > 0
    assert result["loads"]["second"] > 0


def test_plot_cost_benchmark_runs_on_a_tiny_model(tmp_path):
    """benchmarks/plots.py runs lens.run with and without plots in pairs and reports the
    write stage's difference."""
    out = tmp_path / "plots.json"
    stdout = _script("plots.py", "--pairs", "1", *TINY, "--device", "cpu", "--json", str(out))
    assert "plots per model (write stage with plots - without) median " in stdout
    result = json.loads(out.read_text())
    (pair,) = result["pairs"]
    assert pair["plots"][1]["write"] > pair["no_plots"][1]["write"] > 0
    assert result["cost"] == [pair["plots"][1]["write"] - pair["no_plots"][1]["write"]]


def test_probe_benchmark_alternates_the_baseline(tmp_path):
    """benchmarks/probes.py --baseline runs the other checkout and this one in pairs, each
    first in turn, and reports their throughput ratio (here the baseline is this checkout
    again, through a .venv/bin/python of its own)."""
    base = tmp_path / "base"
    (base / ".venv" / "bin").mkdir(parents=True)
    python = base / ".venv" / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    stdout = _script("probes.py", "--model", str(REPO / "tests/models/tiny-gpt2"), "--probe",
                     str(REPO / "tests/probes/tiny-multi.yaml"), "--no-plots", "--baseline",
                     str(base), "--pairs", "2")
    assert "pair 1 (baseline first)" in stdout and "pair 2 (this checkout first)" in stdout
    assert stdout.count("this checkout: 4 facts") == stdout.count(f"baseline {base}: 4 facts") == 2
    assert "median throughput ratio over 2 pairs: " in stdout


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_benchmarks_run_on_cuda(tmp_path):
    """On a GPU (benchmarks/gpu_check.sh) both benchmarks wait for their kernels and bench.py
    reads the peak from the CUDA allocator, not the process's RSS."""
    out = tmp_path / "bench.json"
    stdout = _script("bench.py", *TINY, "--device", "cuda", "--reps", "1", "--load-reps", "0",
                     "--json", str(out))
    assert " on cuda" in stdout.splitlines()[0]
    memory = json.loads(out.read_text())["memory"]
    assert memory["method"] == "torch.cuda.max_memory_allocated" and memory["full"] > 0
    stdout = _script("whole.py", "--pairs", "1", *TINY, "--device", "cuda")
    assert "ratio A/B median of pairs = " in stdout
