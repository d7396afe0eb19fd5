"""Passes decoded together (lens.batched) give each pass's own records, within one pass's memory."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from recordkit import close, records_close

from lens.config import RunConfig
from lens.decode import decode_many, slice_rows
from lens.model import capture_batch
from lens.passes import passes_for, run_passes
from lens.probe import load_probe
from lens.records import record_values
from lens.report import build_analysis
from lens.testing import TINY_MODELS

TINY_PROBE = Path(__file__).resolve().parent / "probes" / "tiny-multi.yaml"


def _chunk(model, analysis):  # type: ignore[no-untyped-def]
    passes = [p for fact in load_probe(TINY_PROBE).facts for p in passes_for(fact)]
    caps = capture_batch(model, [p.token_ids(analysis) for p in passes])
    return list(zip(passes, caps, strict=True))


@pytest.mark.parametrize("name", TINY_MODELS)
def test_passes_run_together_equal_each_pass_run_alone(tiny_models, name):
    """Same records, same order, same numbers (float64, to 1e-12) as ``Pass.run`` per pass."""
    model = tiny_models[name]
    analysis = build_analysis(model, RunConfig(dtype="float64", lenses=("logit",)))
    chunk = _chunk(model, analysis)
    assert len({cap.resids.shape[1] for _, cap in chunk}) > 1  # padded rows of several widths
    together = run_passes(analysis, chunk)
    assert len(together) == len(chunk)
    kinds = set()
    for (p, cap), result in zip(chunk, together, strict=True):
        alone = p.run(analysis, cap)
        assert result.ctx.prompt_id == p.prompt_id
        assert result.non_finite_layer == alone.non_finite_layer
        assert len(result.records) == len(alone.records)
        for got, want in zip(result.records, alone.records, strict=True):
            assert type(got) is type(want)
            kinds.add((type(got).__name__, got.lens))
            got_v, want_v = record_values(got), record_values(want)
            assert got_v.keys() == want_v.keys()
            for key in want_v:
                assert close(got_v[key], want_v[key]), (p.prompt_id, p.variant, key)
    assert {("PositionRecord", "norm"), ("NextTokenRecord", "norm"), ("NextTokenRecord", "raw"),
            ("PositionRecord", "logit")} <= kinds


def test_a_shared_chunk_holds_at_most_half_of_one_pass(tiny_models, monkeypatch):
    """Many passes' rows share a matmul, but a chunk stays within half of one pass's logits."""
    model = tiny_models["tiny-llama"]
    analysis = build_analysis(model, RunConfig(dtype="float64"))
    chunk = _chunk(model, analysis)
    widest = max(cap.resids.shape[1] for _, cap in chunk)
    layers = model.n_layers + 1
    bound = math.ceil(layers / 2) * widest * model.d_vocab
    slices = (2 * slice_rows(model.d_vocab) - 1) * model.d_vocab  # the entropy's terms
    decoded = []
    decode = analysis.lens.decode

    def spy(resids, layer_ids, **kwargs):  # type: ignore[no-untyped-def]
        decoded.append(tuple(resids.shape[:2]))
        return decode(resids, layer_ids, **kwargs)

    monkeypatch.setattr(analysis.lens, "decode", spy)
    for rows in ("all", "last"):
        items = [(p.context(analysis, cap, p.token_ids(analysis)),
                  cap.resids if rows == "all" else cap.resids[:, -1:]) for p, cap in chunk]
        seen = {i: [] for i in range(len(items))}
        decoded.clear()
        for i, step in decode_many(items, analysis.lens, widest=widest):
            seen[i].append(step.layer)
            assert step.logits.shape[0] == items[i][1].shape[1]
            buffer = step.row("logits", 0)._base  # the chunk's (a shared prefix's rows: gathered)
            assert buffer.numel() <= 2 * bound + min(slices, bound)  # logits, log-probs
        assert all(layer_order == list(range(layers)) for layer_order in seen.values())
        assert all(n * width * model.d_vocab <= bound for n, width in decoded)
        widest_item = max(r.shape[1] for _, r in items)
        assert max(width for _, width in decoded) > widest_item  # several passes in one matmul


SHARED_PROBE = """\
name: shared
facts:
  - id: germany
    prompt: "The capital of Germany is called simply"
    answer: Berlin
    no_filler: "The capital of Germany is called"
    control: {prompt: "The capital of France is called simply", answer: Paris}
  - id: france
    prompt: "The capital of France is called simply"
    answer: Paris
    control: {prompt: "The capital of Germany is called simply", answer: Berlin}
"""


@pytest.mark.parametrize("name", TINY_MODELS)
def test_a_control_that_is_another_facts_prompt_reads_its_rows(tiny_models, name, tmp_path):
    """Each fact's control is the other's prompt: one forward each (``Forwards``), and the
    control's last rows are read from the other fact's decode, not decoded again; its
    records are those of the control pass run alone (float64, to 1e-12)."""
    from lens.forwards import Forwards
    from lens.passes import decode_calls

    model = tiny_models[name]
    analysis = build_analysis(model, RunConfig(dtype="float64", lenses=("logit",)))
    (tmp_path / "shared.yaml").write_text(SHARED_PROBE)
    passes = [p for fact in load_probe(tmp_path / "shared.yaml").facts for p in passes_for(fact)]
    ids = [p.token_ids(analysis) for p in passes]
    caps = Forwards(model, ids, padded=True).take(ids)
    germany_ctl, france_orig = caps[2], caps[3]
    assert germany_ctl is france_orig and caps[4] is caps[0]
    prepared = [(p.context(analysis, cap, i), cap, p.routes(analysis))
                for p, cap, i in zip(passes, caps, ids, strict=True)]
    calls = decode_calls(prepared)
    decoded = [(i, j) for c in calls for i, j, _ in c.members]
    aliased = [(i, j) for c in calls for i, j, _ in c.aliases]
    assert len(decoded) + len(aliased) == sum(len(r) for *_, r in prepared)
    # passes: germany orig, no_filler, control (= france's prompt); france orig, control
    # (= germany's prompt). Every lens of both controls reads another route's rows, but
    # the raw lens decodes germany's control (the first of the two) and france's orig reads it
    assert sorted(aliased) == sorted([(2, 0), (2, 1), (3, 2), (4, 0), (4, 1), (4, 2)])
    together = run_passes(analysis, list(zip(passes, caps, strict=True)))
    for p, cap, result in zip(passes, caps, together, strict=True):
        alone = p.run(analysis, cap)
        assert len(result.records) == len(alone.records)
        for got, want in zip(result.records, alone.records, strict=True):
            assert records_close(got, want), (p.prompt_id, p.variant)
