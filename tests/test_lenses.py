"""The lens registry and the sidecar lenses: ``--lenses``, the logit lens, a test-only lens.

The logit lens is checked against plain ``transformers`` (its hidden states,
the model's own final norm module and ``lm_head``), never against lens's own
code; its sidecar CSVs are pinned by goldens (regenerate on purpose with
``pytest --snapshot-update`` and say why in the commit).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lens.config import RunConfig, default_probe
from lens.errors import LensError
from lens.lenses import LENSES, LogitLens
from lens.model import capture, tokenize
from lens.passes import passes_for
from lens.plots import EXTRA_STYLES, LENS_STYLES, lens_styles
from lens.report import build_analysis
from lens.testing import TINY_MODELS
from lens.writers import PURE_HEADER, RECORDS_HEADER, read_csv_dicts, read_csv_rows

PROMPT = default_probe().facts[0].prompt
PROBE = Path(__file__).resolve().parent / "probes" / "tiny-multi.yaml"
FLOAT64 = ("--dtype", "float64", "--device", "cpu")


TOLERANCE = {"tiny-gpt2": 1e-9, "tiny-llama": 1e-5}
"""Absolute logit tolerance against ``transformers`` in float64. Its ``LlamaRMSNorm``
normalises in float32 whatever the dtype (``hidden_states.to(torch.float32)``), so
the llama reference itself carries float32 rounding (≈ 4e-7 per norm call, ≈ 3e-6
after the blocks' own norms); GPT-2's LayerNorm stays in float64."""


@pytest.mark.parametrize("name", TINY_MODELS)
def test_logit_lens_equals_plain_transformers_at_every_layer(tiny_models, name):
    """final_norm(h_l) @ lm_head at each layer, as ``transformers`` computes it (float64)."""
    model = tiny_models[name]
    (logit,) = [lens for lens in build_analysis(model, RunConfig(dtype="float64")).sidecar_lenses
                if lens.name == "logit"]
    ids = tokenize(model, PROMPT)
    resids = capture(model, ids).resids
    hf = AutoModelForCausalLM.from_pretrained(f"tests/models/{name}", dtype=torch.float64)
    final_norm = hf.model.norm if name == "tiny-llama" else hf.transformer.ln_f
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
        hidden = out.hidden_states  # the last one is already through the final norm
        want = [hf.lm_head(final_norm(h[0])) for h in hidden[:-1]] + [out.logits[0]]
    assert len(want) == model.n_layers + 1 == resids.shape[0]
    for layer, expected in enumerate(want):
        got = logit.forward(resids[layer], layer)
        assert float((got - expected).abs().max()) < TOLERANCE[name], layer


@pytest.mark.parametrize("name", TINY_MODELS)
def test_logit_sidecar_csvs_match_golden(name, run_lens, golden_csv):
    status, files, err = run_lens(f"tests/models/{name}", *FLOAT64, "--lenses", "logit")
    assert status == 0, err
    assert files[f"output-{name}-records-logit.csv"] == golden_csv(name="records-logit")
    assert (files[f"output-{name}-pure-next-token-logit.csv"]
            == golden_csv(name="pure-next-token-logit"))


def test_logit_lens_sees_earlier_than_the_norm_lens_on_the_head(run_lens):
    """Same rows as the primary; at the last layer both are the model's head (KL 0)."""
    name = "tiny-llama"
    status, files, err = run_lens(f"tests/models/{name}", *FLOAT64)
    assert status == 0, err
    primary = read_csv_dicts(files[f"output-{name}-pure-next-token.csv"])
    logit = read_csv_dicts(files[f"output-{name}-pure-next-token-logit.csv"])
    key = ("prompt_id", "prompt_variant", "layer")
    assert [[r[k] for k in key] for r in primary] == [[r[k] for k in key] for r in logit]
    last = [r for r in logit if r["layer"] == "4"]
    assert last and all(float(r["kl_to_final_bits"]) < 1e-9 for r in last)
    assert any(a["kl_to_final_bits"] != b["kl_to_final_bits"]
               for a, b in zip(primary, logit, strict=True))
    summary = json.loads(files[f"output-{name}.json"])["diagnostics"]["lens_summaries"]
    assert list(summary) == ["logit"]
    assert summary["logit"]["last_layer_kl_bits"] == 0
    assert set(summary["logit"]) == {"L_semantic", "first_rank_le_1", "first_rank_le_5",
                                     "first_rank_le_10", "first_kl_below_0.5",
                                     "first_kl_below_1.0", "last_layer_kl_bits"}


# --- the registry ---------------------------------------------------------------------


class HalfLogitLens(LogitLens):
    """A test-only lens: the logit lens on half the normalised residual (a hotter softmax)."""

    name = "half"

    def transform(self, resid, layer):
        return 0.5 * super().transform(resid, layer)


def test_a_new_lens_is_a_subclass_and_one_registry_line(monkeypatch, run_lens):
    monkeypatch.setitem(LENSES, "half", HalfLogitLens.resolve)
    name = "tiny-gpt2"
    status, files, err = run_lens(f"tests/models/{name}", *FLOAT64, "--probe", str(PROBE),
                                  "--lenses", "logit,half")
    assert status == 0, err
    for lens in ("logit", "half"):
        records = read_csv_rows(files[f"output-{name}-records-{lens}.csv"])
        pure = read_csv_rows(files[f"output-{name}-pure-next-token-{lens}.csv"])
        assert tuple(records[0][1:]) == RECORDS_HEADER and tuple(pure[0][1:]) == PURE_HEADER
        assert len(records) == len(read_csv_rows(files[f"output-{name}-records.csv"]))
    half = read_csv_dicts(files[f"output-{name}-pure-next-token-half.csv"])
    logit = read_csv_dicts(files[f"output-{name}-pure-next-token-logit.csv"])
    assert all(float(h["entropy"]) > float(g["entropy"]) for h, g in zip(half, logit, strict=True))
    report = json.loads(files[f"output-{name}.json"])
    assert list(report["diagnostics"]["lens_summaries"]) == ["logit", "half"]
    aggregate = json.loads(files[f"output-{name}-aggregate.json"])
    assert list(aggregate["sidecar_metrics"]) == ["logit", "half"]
    assert aggregate["sidecar_metrics"]["half"].keys() == aggregate["metrics"].keys()
    assert files[f"output-{name}-trajectories.png"].startswith(b"\x89PNG")


def test_raw_as_a_sidecar_writes_its_csvs(run_lens):
    name = "tiny-llama"
    status, files, err = run_lens(f"tests/models/{name}", *FLOAT64, "--lenses", "raw")
    assert status == 0, err
    assert f"output-{name}-records-logit.csv" not in files
    raw = read_csv_dicts(files[f"output-{name}-pure-next-token-raw.csv"])
    assert float(raw[-1]["kl_to_final_bits"]) > 1e-3  # no final norm: not the head
    summaries = json.loads(files[f"output-{name}.json"])["diagnostics"]["lens_summaries"]
    assert list(summaries) == ["raw"]


def test_no_sidecar_lenses_writes_only_the_primary(tiny_models):
    analysis = build_analysis(tiny_models["tiny-llama"], RunConfig(dtype="float64", lenses=()))
    assert analysis.sidecar_lenses == ()
    assert [lens.name for lens in analysis.next_token_lenses] == ["raw"]


@pytest.mark.parametrize(("value", "expected"), [
    ("logit,bogus", "--lenses: unknown lens 'bogus'; choose from logit, tuned, prism, raw"),
    ("norm", "--lenses: 'norm' is the primary lens and always runs"),
    ("logit,logit", "--lenses names a lens twice: logit,logit"),
])
def test_bad_lens_names_give_one_line(value, expected, run_lens):
    status, files, err = run_lens("tests/models/tiny-llama", "--lenses", value)
    lines = err.strip().splitlines()
    assert status == 1 and len(lines) == 1 and lines[0].startswith(f"lens: error: {expected}")
    assert not any(n.startswith("output-") for n in files)
    with pytest.raises(LensError, match="--lenses"):
        RunConfig(lenses=tuple(value.split(",")))


def test_fitted_lenses_without_artifacts_are_skipped_with_a_reason(tiny_models, tmp_path):
    analysis = build_analysis(tiny_models["tiny-llama"],
                              RunConfig(dtype="float64", prism_dir=tmp_path))
    assert [lens.name for lens in analysis.sidecar_lenses] == ["logit"]
    summary = analysis.resolver_summaries["prism"]
    assert summary["present"] is False and summary["compatible"] is False and summary["error"]


def test_every_lens_gets_its_own_line_style():
    styles = lens_styles(["raw", "norm", "zeta", "logit", "prism", "tuned", "alpha"])
    assert list(styles) == ["norm", "logit", "raw", "prism", "tuned", "zeta", "alpha"]
    assert len({repr(style) for style, _ in styles.values()}) == len(styles)
    assert styles["zeta"] in EXTRA_STYLES and styles["alpha"] in EXTRA_STYLES
    assert all(styles[n] == LENS_STYLES[n] for n in ("norm", "logit", "raw", "prism", "tuned"))


def test_passes_decode_only_the_rows_they_write(tiny_models, monkeypatch):
    """pos/orig writes per-position records for the primary and sidecar lenses; nothing
    else reads more than the last position, so nothing else decodes more."""
    model = tiny_models["tiny-llama"]
    analysis = build_analysis(model, RunConfig(dtype="float64"))
    decoded: list[tuple[str, int]] = []
    for lens in (analysis.lens, *analysis.sidecar_lenses, *analysis.next_token_lenses):
        def spy(resids, layers, _decode=lens.decode, _name=lens.name, **kwargs):
            decoded.append((_name, int(resids.shape[1])))
            return _decode(resids, layers, **kwargs)
        monkeypatch.setattr(lens, "decode", spy)
    seen = {}
    for p in passes_for(default_probe().facts[0]):
        decoded.clear()
        p.run(analysis)
        seen[f"{p.prompt_id}/{p.variant}"] = sorted(set(decoded))
    n = len(tokenize(model, PROMPT))
    assert seen == {"pos/orig": [("logit", n), ("norm", n), ("raw", 1)],
                    "pos/no_filler": [("logit", 1), ("norm", 1), ("raw", 1)],
                    "ctl/orig": [("logit", 1), ("norm", 1), ("raw", 1)]}
