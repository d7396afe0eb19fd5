"""Statistics across facts: medians, seeded bootstrap intervals, missing values, paired differences."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lens.aggregate import METRICS, PAIRED, RESAMPLES, aggregate_report, fact_metrics, median_ci
from lens.config import SEED
from lens.records import NextTokenRecord


def record(layer: int, *, copy: bool = False, answer: bool = False, kl: float = 5.0,
           rank: int | None = 50) -> NextTokenRecord:
    return NextTokenRecord(
        lens="norm", prompt_id="pos", variant="orig", layer=layer, pos=3, token="⟨NEXT⟩",
        entropy=1.0, topk=(), rest_mass=0.0, copy_collapse=copy, entropy_collapse=False,
        is_answer=answer, p_top1=0.5, p_top5=0.9, p_answer=None if rank is None else 0.1,
        kl_to_final_bits=kl, answer_rank=rank, cos_to_final=0.5, control_margin=None)


def trajectory(n_layers: int, *, copy_at: int | None, answer_at: int | None,
               kl_at: int) -> list[NextTokenRecord]:
    return [record(layer, copy=layer == copy_at,
                   answer=answer_at is not None and layer >= answer_at,
                   kl=0.5 if layer >= kl_at else 3.0,
                   rank=1 if answer_at is not None and layer >= answer_at else 40)
            for layer in range(n_layers + 1)]


def test_fact_metrics_reads_the_milestones():
    m = fact_metrics(trajectory(8, copy_at=2, answer_at=6, kl_at=7), 8)
    assert m == {"L_copy": 2, "L_semantic": 6, "L_copy_frac": 0.25, "L_semantic_frac": 0.75,
                 "first_kl_below_1.0": 7, "first_rank_le_1": 6}
    never = fact_metrics(trajectory(8, copy_at=None, answer_at=None, kl_at=8), 8)
    assert never["L_copy"] is None and never["L_semantic_frac"] is None
    assert never["first_rank_le_1"] is None and never["first_kl_below_1.0"] == 8


def test_median_ci_matches_a_hand_computation():
    values = [3, 5, None, 9, 4, 12, None, 7]
    got = median_ci(values)
    present = np.array([3, 5, 9, 4, 12, 7], dtype=float)
    rng = np.random.Generator(np.random.PCG64(SEED))
    medians = np.median(present[rng.integers(0, 6, size=(RESAMPLES, 6))], axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    assert got == {"n": 6, "n_missing": 2, "median": 6.0, "ci_low": low, "ci_high": high}
    assert median_ci(values) == got  # seeded: the same every time


def test_median_ci_edge_cases():
    assert median_ci([]) == {"n": 0, "n_missing": 0, "median": None, "ci_low": None,
                             "ci_high": None}
    assert median_ci([None, None])["n_missing"] == 2
    assert median_ci([None, 4]) == {"n": 1, "n_missing": 1, "median": 4.0, "ci_low": 4.0,
                                    "ci_high": 4.0}


@given(st.lists(st.one_of(st.none(), st.integers(0, 80)), min_size=1, max_size=40))
def test_interval_is_ordered_and_inside_the_data(values):
    got = median_ci(values)
    present = [v for v in values if v is not None]
    assert got["n"] + got["n_missing"] == len(values)
    if present:
        assert min(present) <= got["ci_low"] <= got["ci_high"] <= max(present)
        assert min(present) <= got["median"] <= max(present)


def test_aggregate_pairs_orig_and_no_filler_per_fact():
    n = 10
    facts = [
        ("a", trajectory(n, copy_at=2, answer_at=8, kl_at=9), trajectory(n, copy_at=3, answer_at=7, kl_at=9)),
        ("b", trajectory(n, copy_at=None, answer_at=6, kl_at=8), trajectory(n, copy_at=1, answer_at=6, kl_at=8)),
        ("c", trajectory(n, copy_at=4, answer_at=None, kl_at=10), None),
    ]
    agg = aggregate_report(model_id="m", probe="p", n_layers=n, lens="norm", facts=facts)
    assert agg["n_facts"] == 3 and agg["fact_ids"] == ["a", "b", "c"] and agg["num_layers"] == n
    assert agg["statistic"]["resamples"] == RESAMPLES and agg["statistic"]["seed"] == SEED
    assert list(agg["metrics"]) == list(METRICS)
    sem = agg["metrics"]["L_semantic"]
    assert (sem["orig"]["n"], sem["orig"]["n_missing"], sem["orig"]["median"]) == (2, 1, 7.0)
    assert (sem["no_filler"]["n"], sem["no_filler"]["n_missing"]) == (2, 1)
    assert sem[PAIRED]["n"] == 2 and sem[PAIRED]["median"] == pytest.approx(0.5)  # (8-7, 6-6)
    copy = agg["metrics"]["L_copy"]
    assert copy[PAIRED]["n"] == 1 and copy[PAIRED]["median"] == -1.0  # only fact a has both
    frac = agg["metrics"]["L_semantic_frac"]["orig"]
    assert frac["median"] == pytest.approx(0.7)
