"""A prompt prefix that passes share is decoded once (lens.rowgroups), and a many-fact probe
decodes several forward batches together (lens.forwards.windows)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from recordkit import records_close

from lens.config import RunConfig
from lens.forwards import windows
from lens.model import capture_batch
from lens.passes import passes_for, run_passes
from lens.probe import load_probe, parse_probe
from lens.report import analyse, build_analysis
from lens.rowgroups import group_rows
from lens.steptensors import StepTensors
from lens.testing import TINY_MODELS

TINY_PROBE = Path(__file__).resolve().parent / "probes" / "tiny-multi.yaml"


def _item(ids, resids):  # type: ignore[no-untyped-def]
    return SimpleNamespace(input_ids=tuple(ids)), resids


def _pair():  # type: ignore[no-untyped-def]
    """Two prompts of 6 and 7 tokens whose first 4 are the same, with the same rows there."""
    torch.manual_seed(0)
    prefix = torch.randn(3, 4, 8)  # (layers, positions, d_model)
    a = torch.cat([prefix, torch.randn(3, 2, 8)], dim=1)
    b = torch.cat([prefix.clone(), torch.randn(3, 3, 8)], dim=1)
    return _item([1, 2, 3, 4, 5, 6], a), _item([1, 2, 3, 4, 9, 9, 9], b)


def test_a_shared_prefix_takes_the_earlier_items_rows():
    items = list(_pair())
    [group] = group_rows(items, budget=100)
    assert group.width == 6 + 3 and group.firsts == (0, 4)
    assert group.rows == (slice(0, 6), (0, 1, 2, 3, 6, 7, 8))
    resids = group.resids(items)
    for (_, rows), member in zip(items, group.rows, strict=True):
        index = list(range(9))[member] if isinstance(member, slice) else list(member)
        assert torch.equal(resids[:, index], rows)
    assert [group.last(m) for m in range(2)] == [5, 8]


def test_equal_tokens_whose_rows_differ_are_decoded_again():
    """The tokens match, but one layer's row differs in one element: shared up to it only."""
    a, (ctx, b) = _pair()
    b = b.clone()
    b[1, 2, 0] = torch.nextafter(b[1, 2, 0], torch.tensor(float("inf")))
    [group] = group_rows([a, (ctx, b)], budget=100)
    assert group.firsts == (0, 2) and group.width == 6 + 5


def test_a_prefix_taken_from_two_earlier_items():
    """c's first three rows are a's, its fourth b's (b branched from a after three): two
    runs, each checked against its own item; a row of the second that differs ends it."""
    torch.manual_seed(1)
    a = torch.randn(3, 6, 8)
    b = torch.cat([a[:, :3], torch.randn(3, 2, 8)], dim=1)
    c = torch.cat([b[:, :4], torch.randn(3, 1, 8)], dim=1)
    items = [_item([1, 2, 3, 4, 5, 6], a), _item([1, 2, 3, 7, 8], b), _item([1, 2, 3, 7, 9], c)]
    [group] = group_rows(items, budget=100)
    assert group.rows[1] == (0, 1, 2, 6, 7) and group.rows[2] == (0, 1, 2, 6, 8)
    assert group.width == 9
    c = c.clone()
    c[2, 3, 5] += 1.0  # the row b gives: no longer equal
    [group] = group_rows([*items[:2], _item([1, 2, 3, 7, 9], c)], budget=100)
    assert group.firsts == (0, 3, 3) and group.rows[2] == (0, 1, 2, 8, 9)


def test_a_last_position_alone_shares_nothing():
    """An item of one row (a pass decoded at its last position) has no prefix rows."""
    a, (ctx, b) = _pair()
    [group] = group_rows([a, (ctx, b[:, -1:])], budget=100)
    assert group.firsts == (0, 0) and group.rows == (slice(0, 6), slice(6, 7))


def test_a_group_is_filled_by_its_distinct_rows():
    items = list(_pair())
    assert [g.members for g in group_rows(items, budget=9)] == [(0, 1)]  # 6 + 3 new rows
    assert [g.members for g in group_rows(items, budget=8)] == [(0,), (1,)]
    assert [g.firsts for g in group_rows(items, budget=8)] == [(0,), (0,)]  # a new group: own rows


def test_a_step_reads_its_rows_as_views_or_gathered():
    decoded = tuple(torch.arange(6 * k, dtype=torch.float64).view(6, k) for k in (5, 5, 1, 2, 2))
    resid = torch.randn(4, 3)
    view = StepTensors(decoded, [2, 3, 4, 5], resid)  # consecutive rows: a slice
    storage = decoded[0].untyped_storage().data_ptr()
    assert view.get("logits").untyped_storage().data_ptr() == storage and view.n_rows == 4
    shared = StepTensors(decoded, (0, 1, 4, 5), resid)
    assert torch.equal(shared.get("logp"), decoded[1][[0, 1, 4, 5]])
    one = shared.row("logp", 2)
    assert one.untyped_storage().data_ptr() == decoded[1].untyped_storage().data_ptr()
    assert torch.equal(one, decoded[1][4])
    last = shared.last_only()
    assert torch.equal(last.get("top_p"), decoded[3][5:6])
    assert torch.equal(last.get("resid"), resid[3:4])
    kept = shared.copy()
    assert torch.equal(kept.get("logits"), shared.get("logits"))
    assert kept.get("logits").untyped_storage().data_ptr() != storage


def test_windows_hold_batches_within_the_budget():
    # batches of 3 prompts of 5 tokens: 150 elements each at 10 per token
    assert windows([5] * 10, 3, per_token=10, budget=300) == [[(0, 3), (3, 6)], [(6, 9), (9, 10)]]
    assert windows([5] * 10, 3, per_token=10, budget=100) == [[(0, 3)], [(3, 6)], [(6, 9)],
                                                              [(9, 10)]]  # a batch alone
    assert windows([5] * 4, 4, per_token=10) == [[(0, 4)]]


TEMPLATE_PROBE = {"name": "template", "facts": [
    {"id": "germany", "prompt": "The capital of Germany is called simply", "answer": "Berlin",
     "no_filler": "The capital of Germany is called"},
    {"id": "france", "prompt": "The capital of France is called simply", "answer": "Paris"},
    {"id": "germany-named", "prompt": "The capital city of Germany is named simply",
     "answer": "Berlin"},
]}


@pytest.mark.parametrize("name", TINY_MODELS)
def test_passes_of_one_template_decode_its_prefix_once(tiny_models, name, monkeypatch):
    """Three facts share "The capital": its rows are decoded once, and every pass's records
    are those of the pass run alone (float64, to 1e-12)."""
    model = tiny_models[name]
    analysis = build_analysis(model, RunConfig(dtype="float64"))
    passes = [p for f in parse_probe(TEMPLATE_PROBE, "t").facts for p in passes_for(f)]
    ids = [p.token_ids(analysis) for p in passes]
    caps = capture_batch(model, ids)
    orig = [i for i, p in enumerate(passes) if p.variant == "orig"]
    prefixes = {tuple(ids[i][:n]) for i in orig for n in range(1, len(ids[i]) + 1)}
    every = sum(len(ids[i]) for i in orig)  # the orig passes' positions
    assert len(prefixes) <= every - 2 * 2  # "The capital": 2 tokens at least, 3 prompts
    decoded = []
    decode = analysis.lens.decode

    def spy(resids, layers, **kwargs):  # type: ignore[no-untyped-def]
        decoded.append(resids.shape[0] * resids.shape[1])
        return decode(resids, layers, **kwargs)

    monkeypatch.setattr(analysis.lens, "decode", spy)
    together = run_passes(analysis, list(zip(passes, caps, strict=True)))
    layers = model.n_layers + 1
    last = len(passes) - len(orig)  # the others: their last position
    assert sum(decoded) == layers * (len(prefixes) + last)  # a row per distinct prefix
    monkeypatch.undo()
    for p, cap, result in zip(passes, caps, together, strict=True):
        alone = p.run(analysis, cap)
        assert len(result.records) == len(alone.records)
        for got, want in zip(result.records, alone.records, strict=True):
            assert records_close(got, want), (p.prompt_id, p.variant)



def test_a_probe_decodes_its_forward_batches_together(tiny_models, monkeypatch):
    """Batches of 2 prompts, decoded in one window; with a window of one batch each, the
    same records (float64, to 1e-12)."""
    import lens.forwards
    import lens.report

    model = tiny_models["tiny-llama"]
    probe = load_probe(TINY_PROBE)
    config = RunConfig(dtype="float64", batch_size=2)
    calls: list[int] = []
    run_passes_ = lens.report.run_passes

    def spy(analysis, chunk, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(chunk))
        return run_passes_(analysis, chunk, **kwargs)

    monkeypatch.setattr(lens.report, "run_passes", spy)
    together = analyse(model, probe, config)
    n_passes = sum(len(passes_for(f)) for f in probe.facts)
    assert calls == [n_passes]  # the tiny model's residuals: far within one window
    calls.clear()
    monkeypatch.setattr(lens.forwards, "WINDOW_ELEMENTS", 1)
    alone = analyse(model, probe, config)
    assert calls == [2] * (n_passes // 2) + [n_passes % 2] * (n_passes % 2)
    assert len(together.records) == len(alone.records)
    for got, want in zip(together.records, alone.records, strict=True):
        assert records_close(got, want)
