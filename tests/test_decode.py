"""The numbers ``lens.decode`` computes per chunk, against a plain computation row by row.

``last_rows`` computes the next-token record's p_top1, p_answer, rank, KL to
the head and cosine for every layer and pass of a chunk at once; here each
record of a real run (several facts decoded together, float64) is recomputed
from its residual with plain softmax/sum formulas, one layer and pass at a time.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lens import decode, metrics
from lens.config import RunConfig
from lens.decode import Workspace, decode_many, finite_rows, last_rows, row_slices
from lens.model import capture_batch
from lens.passes import passes_for, run_passes
from lens.probe import load_probe
from lens.records import NextTokenRecord
from lens.report import build_analysis
from lens.testing import TINY_MODELS

TINY_PROBE = Path(__file__).resolve().parent / "probes" / "tiny-multi.yaml"


def _expected(logits: torch.Tensor, head: torch.Tensor, gold: int | None,
              contrast: int | None) -> dict[str, float | int | None]:
    """One row's numbers, written out from their definitions."""
    p = torch.softmax(logits, dim=-1)
    q = torch.softmax(head, dim=-1)
    keep = p > 0
    kl = float((p[keep] * (p[keep].log() - q[keep].log())).sum() / math.log(2))
    cos = float(logits @ head / (logits.norm() * head.norm()))
    top = int(torch.argmax(p))
    out: dict[str, float | int | None] = {"p_top1": float(p[top]), "kl": kl, "cos": cos,
                                          "p_answer": None, "rank": None, "margin": None}
    if gold is not None:
        out["p_answer"] = float(p[gold])
        out["rank"] = 1 + int((p > p[gold]).sum())
        if contrast is not None:
            out["margin"] = float(p[gold] - p[contrast])
    return out


@pytest.mark.parametrize("name", TINY_MODELS)
def test_next_token_numbers_equal_a_row_by_row_computation(tiny_models, name):
    model = tiny_models[name]
    analysis = build_analysis(model, RunConfig(dtype="float64", lenses=("logit",)))
    passes = [p for fact in load_probe(TINY_PROBE).facts for p in passes_for(fact)]
    caps = capture_batch(model, [p.token_ids(analysis) for p in passes])
    results = run_passes(analysis, list(zip(passes, caps, strict=True)))
    lenses = {lens.name: lens for lens in (analysis.lens, *analysis.sidecar_lenses,
                                           *analysis.next_token_lenses)}
    checked = 0
    for result, cap in zip(results, caps, strict=True):
        ctx = result.ctx
        for r in result.records:
            if not isinstance(r, NextTokenRecord):
                continue
            logits = lenses[r.lens].forward(cap.resids[r.layer, -1:], r.layer)[0]
            want = _expected(logits, ctx.head_logits, ctx.gold.first_id, ctx.contrast_first_id)
            assert r.p_top1 == pytest.approx(want["p_top1"], rel=1e-9, abs=1e-12)
            assert r.kl_to_final_bits == pytest.approx(want["kl"], rel=1e-9, abs=1e-9)
            assert r.cos_to_final == pytest.approx(want["cos"], rel=1e-9, abs=1e-12)
            assert r.answer_rank == want["rank"]
            if want["p_answer"] is None:
                assert r.p_answer is None
            else:
                assert r.p_answer == pytest.approx(want["p_answer"], rel=1e-9, abs=1e-12)
            if ctx.contrast_first_id is not None and want["margin"] is not None:
                assert r.control_margin == pytest.approx(want["margin"], rel=1e-9, abs=1e-9)
            checked += 1
    assert checked >= len(passes) * (model.n_layers + 1) * 2  # norm and logit at least


def test_finite_rows_equals_an_elementwise_check():
    x = torch.randn(4, 5, 33)
    x[0, 1, 3] = math.inf
    x[1, 2, 0] = -math.inf
    x[2, 0, 7] = math.nan
    x[3, 4] = 3e38  # every term finite, their sum overflows
    assert torch.equal(finite_rows(x), x.isfinite().all(dim=-1))


def test_a_row_with_a_non_finite_log_probability_is_not_finite(tiny_models):
    model = tiny_models["tiny-llama"]
    analysis = build_analysis(model, RunConfig(dtype="float64"))
    orig = passes_for(load_probe(TINY_PROBE).facts[0])[0]
    ids = orig.token_ids(analysis)
    (cap,) = capture_batch(model, [ids])
    ctx = orig.context(analysis, cap, ids)
    logits = analysis.lens.decode(cap.resids[:2, -1:], [0, 1]).to(torch.float64)
    logits[1, 0, 5] = -math.inf  # a token the lens rules out: its log-probability is -inf
    logp = torch.log_softmax(logits, dim=-1)
    rows = last_rows([ctx], logits, logp, [0])
    assert rows[0][0].finite and not rows[1][0].finite


def test_a_workspace_is_reused_across_calls_and_gives_the_same_steps(tiny_models):
    """Every ``decode_many`` call of a run borrows the run's one buffer (no fresh
    100 MB per call); the steps are those of a call with buffers of its own, and
    a call made while the buffer is borrowed gets a buffer of its own."""
    model = tiny_models["tiny-llama"]
    analysis = build_analysis(model, RunConfig(dtype="float64", lenses=()))
    fact = load_probe(TINY_PROBE).facts[0]
    passes = passes_for(fact)
    caps = capture_batch(model, [p.token_ids(analysis) for p in passes])
    items = [(p.context(analysis, cap, p.token_ids(analysis)), cap.resids)
             for p, cap in zip(passes, caps, strict=True)]

    def values(workspace: Workspace | None) -> list[tuple[int, int, list[float], list[float]]]:
        return [(i, s.layer, s.entropy.tolist(), s.logp[-1].tolist())
                for i, s in decode_many(items, analysis.lens, workspace=workspace)]

    workspace = Workspace()
    first = values(workspace)
    storage = workspace._buffer.untyped_storage().data_ptr()
    assert values(workspace) == first == values(None)
    assert workspace._buffer.untyped_storage().data_ptr() == storage
    outer = decode_many(items, analysis.lens, workspace=workspace)
    step = next(outer)[1]
    inner = next(decode_many(items, analysis.lens, workspace=workspace))[1]
    assert inner.logits.untyped_storage().data_ptr() != step.logits.untyped_storage().data_ptr()
    assert step.logits.untyped_storage().data_ptr() == storage
    workspace.release()  # borrowed: kept
    assert workspace._buffer is not None
    outer.close()
    workspace.release()  # a run's passes are done: freed
    assert workspace._buffer is None


@pytest.mark.parametrize("per", [1, 2, 3, 5])
def test_row_slices_cover_the_rows_and_never_leave_one_row_alone(per):
    least = max(2, per)
    for n in range(1, 40):
        slices = row_slices(n, per)
        sizes = [b - a for a, b in slices]
        assert slices[0][0] == 0 and slices[-1][1] == n and sum(sizes) == n
        assert all(b == a for (_, b), (a, _) in zip(slices[:-1], slices[1:], strict=True))
        assert n == 1 or 1 not in sizes
        assert len(sizes) == 1 or all(least <= s < 2 * least for s in sizes)


def test_row_slices_give_each_row_the_entropy_it_has_among_all_rows():
    """torch sums a single row in two halves (one per thread), rows of several whole:
    a row reduced alone may differ in the last bit, so no slice is a single row."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for n in (2, 3, 5, 7):
            logp = torch.log_softmax(torch.randn(n, 49_152) * 6, dim=-1)
            whole = metrics.entropy_bits(logp)
            sliced = torch.cat([metrics.entropy_bits(logp[a:b]) for a, b in row_slices(n, 2)])
            assert torch.equal(sliced, whole)
    finally:
        torch.set_num_threads(threads)


def test_a_chunk_sliced_for_its_row_wise_work_gives_the_steps_of_one_slice(tiny_models,
                                                                          monkeypatch):
    """Log-softmax, entropy and top-k run a slice of rows at a time (``ROW_SLICE_ELEMENTS``):
    the steps are bit for bit those of the whole chunk at once."""
    model = tiny_models["tiny-llama"]
    analysis = build_analysis(model, RunConfig(dtype="float32", lenses=()))
    passes = passes_for(load_probe(TINY_PROBE).facts[0])
    caps = capture_batch(model, [p.token_ids(analysis) for p in passes])
    items = [(p.context(analysis, cap, p.token_ids(analysis)), cap.resids)
             for p, cap in zip(passes, caps, strict=True)]
    slices = []
    real = decode.row_slices
    monkeypatch.setattr(decode, "row_slices", lambda n, per: slices.append(real(n, per))
                        or slices[-1])

    def steps(elements: int) -> list[tuple]:
        monkeypatch.setattr(decode, "ROW_SLICE_ELEMENTS", elements)
        slices.clear()
        return [(i, s.layer, s.logits.tolist(), s.logp.tolist(), s.entropy.tolist(),
                 s.top_p.tolist(), s.top_ids.tolist(), s.values, s.last)
                for i, s in decode_many(items, analysis.lens)]

    whole = steps(1 << 40)
    assert all(len(s) == 1 for s in slices)
    assert steps(1) == whole
    assert max(len(s) for s in slices) > 2  # two or three rows at a time


def test_last_row_numbers_do_not_depend_on_how_layers_are_chunked():
    """One pass's last rows (one row per layer) give each layer the same KL and cosine
    bits whether its chunk holds 1, 3, 5 or 8 layers, on one thread or two: torch
    splits the sum of a lone row between threads, so no row is reduced alone."""
    from types import SimpleNamespace

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 1, 49_152, generator=gen) * 4
    logp = torch.log_softmax(logits, dim=-1)
    head = torch.randn(49_152, generator=gen) * 4
    ctx = SimpleNamespace(head_logits=head, head_logp=torch.log_softmax(head, dim=-1),
                          gold=SimpleNamespace(first_id=7), contrast_first_id=None)

    def numbers(chunk: int) -> list[tuple[float, float, float]]:
        rows = [r for s in range(0, 8, chunk)
                for r in last_rows([ctx], logits[s:s + chunk], logp[s:s + chunk], [0])]
        return [(r[0].kl_bits, r[0].cosine, r[0].p_answer) for r in rows]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        want = numbers(8)
        assert all(numbers(chunk) == want for chunk in (1, 3, 5))
        torch.set_num_threads(1)
        assert numbers(8) == want
    finally:
        torch.set_num_threads(threads)


def test_last_rows_numbers_do_not_depend_on_the_blocks_they_are_worked_in():
    """Many passes' last rows, gathered or read in place, in blocks of whole layers or of
    a layer's passes in parts (as the scratch allows): every number the same bits."""
    from types import SimpleNamespace

    from lens.decode import LAST_TEMPS

    gen = torch.Generator().manual_seed(11)
    vocab = 49_152
    logits = torch.randn(4, 9, vocab, generator=gen) * 4
    logp = torch.log_softmax(logits, dim=-1)
    logp[2, 5, 17] = math.nan  # one row not finite
    top_ids = torch.topk(logp, 5, dim=-1).indices

    def ctx(i: int) -> SimpleNamespace:
        head = torch.randn(vocab, generator=gen) * 4
        return SimpleNamespace(head_logits=head, head_logp=torch.log_softmax(head, dim=-1),
                               gold=SimpleNamespace(first_id=i * 31), contrast_first_id=i + 1)

    ctxs = [ctx(i) for i in range(9)]
    threads = torch.get_num_threads()
    try:
        for n_threads in (2, 1):
            torch.set_num_threads(n_threads)
            for lasts in ([8, 2, 5, 0, 8, 1, 3], list(range(9))):  # gathered; in place
                here = ctxs[:len(lasts)]
                want = repr(last_rows(here, logits, logp, lasts, top_ids))
                for rows in (1, 2, 3, 5, 9, 40):
                    scratch = torch.empty(LAST_TEMPS * rows * vocab)
                    assert repr(last_rows(here, logits, logp, lasts, top_ids,
                                          scratch=scratch)) == want, (n_threads, lasts, rows)
    finally:
        torch.set_num_threads(threads)


def test_last_rows_take_the_top_1_from_the_top_k_as_argmax_would():
    """With the chunk's top-k ids the top-1 is read from them, except where the first two
    tie (argmax takes the lowest id) or the row is not finite: the numbers of argmax."""
    from types import SimpleNamespace

    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 3, 500, generator=gen, dtype=torch.float64) * 3
    logits[0, 2, [40, 7, 300]] = 50.0  # a three-way tie at the top: argmax says 7
    logits[1, 2, 11] = math.nan
    logits[2, 2, :] = 1.0  # all tied
    logp = torch.log_softmax(logits, dim=-1)
    top_ids = torch.topk(logp, 5, dim=-1).indices
    head = torch.randn(500, generator=gen, dtype=torch.float64)
    ctxs = [SimpleNamespace(head_logits=head, head_logp=torch.log_softmax(head, dim=-1),
                            gold=SimpleNamespace(first_id=3), contrast_first_id=4)] * 2
    for lasts in ([2, 0], [1, 2]):
        want = last_rows(ctxs, logits, logp, lasts)
        got = last_rows(ctxs, logits, logp, lasts, top_ids)
        assert repr(got) == repr(want)  # NaN in the row that is not finite
    assert want[0][1].top1_id == 7 and want[2][1].top1_id == 0
