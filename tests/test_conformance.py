"""Conformance of the extension points: every (emitter, check) and (lens, check) pair.

In the manner of scikit-learn's estimator checks: each pair is its own test
with a readable id (``PositionEmitter-check_pure``), so a failure names the
emitter or lens and the rule it broke. Steps and residuals come from a real
pass on tiny-llama in float64.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import pytest
import torch

from lens.checks import (
    EMITTER_CHECKS,
    LENS_CHECKS,
    check_emit_signature,
    check_emitter,
    check_last_rows_suffice,
    check_lens,
    check_lens_name,
    check_rows,
    last_row_only,
)
from lens.config import RunConfig, default_probe
from lens.decode import decode_steps
from lens.diagnostic_emitters import LastLayerConsistency, RawLensCheck, prefetch_raw_checks
from lens.emitters import LayerStep, NextTokenEmitter, PositionEmitter
from lens.lenses import LogitLens, NormLens, RawLens
from lens.model import capture, tokenize
from lens.passes import OrigPass
from lens.records import NEXT_TOKEN, Record
from lens.report import build_analysis

EMITTERS = {
    "PositionEmitter": lambda a: PositionEmitter(),
    "NextTokenEmitter": lambda a: NextTokenEmitter(),
    "RawLensCheck": lambda a: RawLensCheck(a.raw),
    "LastLayerConsistency": lambda a: LastLayerConsistency(),
}
LENSES = {
    "NormLens": lambda a: NormLens(a.lens.unembed, a.model.norms),
    "LogitLens": lambda a: LogitLens(a.lens.unembed, a.model.norms[-1]),
    "RawLens": lambda a: RawLens(a.lens.unembed),
}


@pytest.fixture(scope="module")
def setup(tiny_models):
    model = tiny_models["tiny-llama"]
    analysis = build_analysis(model, RunConfig(dtype="float64", raw_lens="full"))
    fact = default_probe().facts[0]
    ids = tokenize(model, fact.prompt)
    cap = capture(model, ids)
    ctx = OrigPass(fact).context(analysis, cap, ids)
    steps = [s.kept() for s in decode_steps(ctx, analysis.lens, cap.resids)]
    return analysis, cap, (steps[0], steps[-1])


@pytest.mark.parametrize("check", EMITTER_CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("make", EMITTERS.values(), ids=list(EMITTERS))
def test_emitter_conforms(setup, make, check):
    analysis, _, steps = setup
    emitter = make(analysis)
    for step in steps:
        check(emitter, step)


@pytest.mark.parametrize("check", LENS_CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("make", LENSES.values(), ids=list(LENSES))
def test_lens_conforms(setup, make, check):
    analysis, cap, _ = setup
    check(make(analysis), cap.resids)


def test_every_emitter_emits_for_its_layers(setup):
    analysis, _, (first, last) = setup
    emitted = {name: [*check_emitter(make(analysis), first), *check_emitter(make(analysis), last)]
               for name, make in EMITTERS.items()}
    assert len(emitted["PositionEmitter"]) == 2 * len(first.ctx.tokens)
    assert [r.token for r in emitted["NextTokenEmitter"]] == [NEXT_TOKEN, NEXT_TOKEN]
    assert [r.layer for r in emitted["RawLensCheck"]] == [first.layer, last.layer]
    assert [r.layer for r in emitted["LastLayerConsistency"]] == [last.layer]


# --- the checks catch what they claim to catch ------------------------------------------


class TwoArguments:
    rows = "last"

    def emit(self, step: LayerStep, extra: int) -> Iterable[Record]:
        return ()


class NoRows:
    def emit(self, step: LayerStep) -> Iterable[Record]:
        return ()


class ClaimsLastReadsAll(PositionEmitter):
    rows = "last"


def test_wrong_emit_signature_is_a_type_error_naming_the_contract(setup):
    with pytest.raises(TypeError, match=r"TwoArguments\.emit\(step.*extra.* does not match"):
        check_emit_signature(TwoArguments(), setup[2][0])
    with pytest.raises(TypeError, match="has no method emit"):
        check_emitter(object(), setup[2][0])


def test_missing_rows_is_a_type_error(setup):
    with pytest.raises(TypeError, match=r"NoRows\.rows is None"):
        check_rows(NoRows(), setup[2][0])


def test_an_emitter_reading_rows_it_does_not_declare_is_caught(setup):
    step = setup[2][0]
    assert len(last_row_only(step).logits) == 1
    with pytest.raises(ValueError, match="reads other positions"):
        check_last_rows_suffice(ClaimsLastReadsAll(), step)


def test_a_lens_without_a_usable_name_is_refused(setup):
    analysis, cap, _ = setup

    class Nameless(RawLens):
        name = ""

    with pytest.raises(TypeError, match="Lens contract"):
        check_lens_name(Nameless(analysis.lens.unembed), cap.resids)


def test_a_lens_mixing_positions_is_caught(setup):
    analysis, cap, _ = setup

    class MeanPooled(RawLens):
        name = "pooled"

        def transform(self, resid, layer):
            return resid - resid.mean(dim=0, keepdim=True)

    with pytest.raises(ValueError, match="positions must be independent"):
        check_lens(MeanPooled(analysis.lens.unembed), cap.resids)


def test_prefetched_raw_rows_give_the_records_the_check_decodes_alone(setup):
    """``prefetch_raw_checks`` decodes every sampled layer's raw row in one matmul;
    the check then emits what it emits decoding each row itself."""
    analysis, cap, (first, last) = setup
    alone, prefetched = RawLensCheck(analysis.raw), RawLensCheck(analysis.raw)
    prefetch_raw_checks([(prefetched, first.ctx, cap.resids)])
    assert sorted(layer for _, layer in prefetched.prefetched) == list(range(cap.resids.shape[0]))
    for step in (first, last):
        row = cap.resids[step.layer, step.ctx.last:step.ctx.last + 1]
        torch.testing.assert_close(prefetched.prefetched[step.ctx, step.layer],
                                   analysis.raw.forward(row, step.layer)[0])
        (a,), (b,) = list(alone.emit(step)), list(prefetched.emit(step))
        assert _close(a, b)


def _close(a: Record, b: Record) -> bool:
    """Equal records up to float rounding (the two matmuls differ in shape)."""
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert x == (pytest.approx(y, rel=1e-9, abs=1e-12) if isinstance(x, float) else y), f.name
    return True
