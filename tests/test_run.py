"""The CLI end to end: outputs, determinism, run directories, and bad input."""

from __future__ import annotations

import datetime as dt
import io
import json

import pandas as pd
import pytest
import torch

from lens.rundir import rotate_latest
from lens.run import main
from lens.testing import MODELS, reproducible
from lens.writers import read_csv_dicts

DIAGNOSTIC_KEYS = {
    "type", "model", "device", "use_norm_lens", "use_fp32_unembed", "unembed_dtype",
    "first_block_ln1_type", "final_ln_type", "layernorm_bias_fix", "norm_alignment_fix",
    "layer0_norm_fix", "mixed_precision_fix", "layer0_position_info", "context_prompt",
    "target_prediction", "gold_alignment", "prism_summary", "lens_summaries",
    "last_layer_consistency",
    "L_copy", "L_copy_H", "L_semantic", "delta_layers", "copy_thresh",
    "copy_window_k", "copy_match_level", "first_kl_below_0.5", "first_kl_below_1.0",
    "first_rank_le_1", "first_rank_le_5", "first_rank_le_10",
}
TOP_KEYS = {"prompt", "diagnostics", "raw_lens_check", "gold_answer", "ablation_summary", "control_prompt",
            "control_summary", "final_prediction", "test_prompts", "temperature_exploration",
            "model_stats"}
CONSISTENCY_KEYS = {"kl_to_final_bits", "top1_agree", "p_top1_lens", "p_top1_model",
                    "p_answer_lens", "answer_rank_lens", "temp_est", "kl_after_temp_bits",
                    "cfg_transform", "kl_after_transform_bits", "warn_high_last_layer_kl"}


def _rows(data: bytes) -> list[dict[str, str]]:
    return read_csv_dicts(data)


def check_outputs(files: dict[str, bytes], name: str) -> dict:
    report = json.loads(files[f"output-{name}.json"])
    assert TOP_KEYS <= report.keys()
    diag = report["diagnostics"]
    assert DIAGNOSTIC_KEYS <= diag.keys()
    assert "raw_lens_check" not in diag  # top level (docs/outputs.md)
    assert {"mode", "samples", "summary"} <= report["raw_lens_check"].keys()
    assert CONSISTENCY_KEYS <= diag["last_layer_consistency"].keys()
    assert len(report["test_prompts"]) == 14
    n_layers = report["model_stats"]["num_layers"]
    records = _rows(files[f"output-{name}-records.csv"])
    orig = [r for r in records if (r["prompt_id"], r["prompt_variant"]) == ("pos", "orig")]
    n_tokens = len({r["pos"] for r in orig})
    assert len(orig) == len(records) == (n_layers + 1) * n_tokens
    pure = _rows(files[f"output-{name}-pure-next-token.csv"])
    assert [(r["prompt_id"], r["prompt_variant"]) for r in pure] == (
        [("pos", "orig")] * (n_layers + 1) + [("pos", "no_filler")] * (n_layers + 1)
        + [("ctl", "orig")] * (n_layers + 1))
    assert all(r["control_margin"] != "" for r in pure if r["prompt_id"] == "ctl")
    assert all(r["control_margin"] == "" for r in pure if r["prompt_id"] == "pos")
    return report


def test_default_model_end_to_end(in_tmp_cwd):
    """The README's command: the embedded SmolLM2 writes everything under run-latest/."""
    assert main(["--quiet"]) == 0
    latest = in_tmp_cwd / "run-latest"
    name = "SmolLM2-135M-Instruct"
    files = {p.name: p.read_bytes() for p in latest.iterdir()}
    report = check_outputs(files, name)
    assert report["final_prediction"]["topk"][0][0] == " Berlin"
    assert report["final_prediction"]["topk"][0][1] > 0.7
    assert report["diagnostics"]["L_semantic"] is not None
    assert report["diagnostics"]["last_layer_consistency"]["kl_to_final_bits"] < 1e-3
    assert any(p.startswith("timestamp-") for p in files)
    assert f"evaluation-{name}.md" in files

    assert main(["--quiet"]) == 0
    rotated = [p for p in in_tmp_cwd.iterdir() if p.name.startswith("run-2")]
    assert len(rotated) == 1
    for fname in (f"output-{name}.json", f"output-{name}-records.csv",
                  f"output-{name}-pure-next-token.csv"):
        assert (rotated[0] / fname).read_bytes() == (latest / fname).read_bytes() == files[fname]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_tiny_model_outputs_complete_and_reproducible(run_lens, name):
    status, files, err = run_lens(f"tests/models/{name}", "--device", "cpu")
    assert status == 0, err
    check_outputs(files, name)
    again = run_lens(f"tests/models/{name}", "--device", "cpu")[1]
    assert reproducible(again) == reproducible(files)
    assert again.keys() == files.keys()


def test_timings_file_has_every_stage(run_lens):
    status, files, _ = run_lens("tests/models/tiny-llama", "--device", "cpu")
    assert status == 0
    timings = json.loads(files["output-tiny-llama-timings.json"])
    assert {"load", "passes", "head_probes", "write", "total"} <= timings.keys()
    assert list(timings["passes"]) == ["all"]  # the three passes, decoded together
    assert list(timings["breakdown"]) == ["capture", "decode", "emit"]
    assert sum(timings["breakdown"].values()) <= timings["passes"]["all"] + 1e-3
    stages = [timings["load"], timings["passes"]["all"], timings["head_probes"], timings["write"]]
    assert all(s >= 0 for s in stages) and sum(stages) <= timings["total"] + 1e-3
    assert "timings" not in files["output-tiny-llama.json"].decode()


def test_tokens_round_trip_through_pandas(run_lens, tiny_models):
    status, files, _ = run_lens("tests/models/tiny-gpt2", "--dtype", "float64")
    assert status == 0
    frame = pd.read_csv(io.BytesIO(files["output-tiny-gpt2-records.csv"]), escapechar="\\",
                        keep_default_na=False, dtype=str, encoding="utf-8")
    model = tiny_models["tiny-gpt2"]
    from lens.model import tokenize
    from lens.tokens import TokenTable

    ids = tokenize(model, "Give the city name only, plain text. The capital of Germany is called simply")
    layer0 = frame[frame["layer"] == "0"]
    assert list(layer0["token"]) == TokenTable(model.tokenizer).texts(ids)


def test_keep_residuals(run_lens):
    status, files, _ = run_lens("tests/models/tiny-llama", "--keep-residuals")
    assert status == 0
    saved = torch.load(io.BytesIO(files["output-tiny-llama-residuals.pt"]))
    assert set(saved) == {"pos/orig", "pos/no_filler", "ctl/orig"}
    assert saved["pos/orig"].shape[0] == 5 and saved["pos/orig"].shape[2] == 32


def test_self_test_passes_and_writes_nothing(in_tmp_cwd, capsys):
    model = str(MODELS / "tiny-llama")
    assert main([model, "--self-test", "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 4 and "FAIL" not in out
    assert list(in_tmp_cwd.iterdir()) == []


def test_never_overwrites_an_earlier_run(run_lens, tmp_path):
    out = tmp_path / "fixed"
    assert run_lens("tests/models/tiny-gpt2", out_dir=out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    status, after, err = run_lens("tests/models/tiny-gpt2", "--raw-lens", "full", out_dir=out)
    assert status == 1 and "never overwrites" in err and len(err.strip().splitlines()) == 1
    assert after == before


def test_rotation_with_a_fixed_clock(tmp_path):
    clock = lambda: dt.datetime(2026, 1, 2, 3, 4)  # noqa: E731
    with rotate_latest(tmp_path, now=clock) as first:
        first.create("a.txt", b"first")
    with rotate_latest(tmp_path, now=clock) as second:
        second.create("a.txt", b"second")
    rotate_latest(tmp_path, now=clock).close()
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert names == ["run-20260102-0304", "run-20260102-0304-2", "run-latest"]
    assert (tmp_path / "run-20260102-0304" / "a.txt").read_text() == "first"
    assert (tmp_path / "run-20260102-0304-2" / "a.txt").read_text() == "second"
    assert (tmp_path / "run-latest" / "timestamp-20260102-0304").exists()


@pytest.mark.parametrize("entry", ["module", "console_script"])
def test_a_process_that_skips_teardown_still_flushes_its_output(tmp_path, entry):
    """``python -m lens.run`` and ``lens-run`` end with ``os._exit``: what they printed into a
    pipe (block-buffered) and every file must be there, and the exit status must be main's."""
    import subprocess
    import sys
    from pathlib import Path

    from lens.testing import REPO

    script = Path(sys.executable).parent / "lens-run"
    if entry == "console_script" and not script.exists():
        pytest.skip("lens-run is not installed next to this interpreter")
    head = [sys.executable, "-m", "lens.run"] if entry == "module" else [str(script)]
    out = tmp_path / "out"
    proc = subprocess.run([*head, "tests/models/tiny-llama", "--device", "cpu", "--no-plots",
                           "--out_dir", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("lens: tiny-llama: ") and proc.stdout.endswith(f"-> {out}\n")
    assert "lens: tiny-llama: seconds: " in proc.stderr
    assert (out / "output-tiny-llama.json").exists()
    again = subprocess.run([*head, "tests/models/tiny-llama", "--device", "cpu", "--no-plots",
                            "--out_dir", str(out)], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 1 and "exists from an earlier run" in again.stderr
