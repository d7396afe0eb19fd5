"""Records as plain values: the shared prefix, ``to_pandas``, and the CSV layout over them."""

from __future__ import annotations

from dataclasses import fields

import pytest

from lens.config import RunConfig, default_probe
from lens.records import NextTokenRecord, PositionRecord, TokenRecord, to_pandas
from lens.report import analyse
from lens.writers import pure_csv, read_csv_dicts, records_csv


def test_both_token_records_start_with_the_shared_prefix():
    prefix = [f.name for f in fields(TokenRecord)]
    for kind in (PositionRecord, NextTokenRecord):
        assert [f.name for f in fields(kind)][:len(prefix)] == prefix


@pytest.fixture(scope="module")
def run(tiny_models):
    return analyse(tiny_models["tiny-gpt2"], default_probe(), RunConfig(dtype="float64"))


@pytest.mark.parametrize(("kind", "to_csv"), [(NextTokenRecord, pure_csv),
                                              (PositionRecord, records_csv)])
def test_to_pandas_holds_the_rows_the_csvs_hold(run, kind, to_csv):
    frame = to_pandas(run.records, kind)
    assert list(frame.columns) == [f.name for f in fields(kind)]
    for lens in ("norm", "logit"):
        rows = read_csv_dicts(to_csv(run.records, lens))
        sel = frame[frame["lens"] == lens]
        assert len(sel) == len(rows) > 0
        assert [str(v) for v in sel["layer"]] == [r["layer"] for r in rows]
        assert [float(r["entropy"]) for r in rows] == pytest.approx(list(sel["entropy"]),
                                                                     rel=1e-9)
