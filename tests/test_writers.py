"""Tests for lens.writers: canonical CSV/JSON bytes and atomic writes."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lens import writers
from lens.writers import csv_bytes, format_float, json_bytes, read_csv_rows, write_atomic

PANDAS_OPTS = {"escapechar": "\\", "keep_default_na": False, "dtype": str, "encoding": "utf-8"}

cell_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
)


def _pandas_rows(data: bytes) -> list[list[str]]:
    return pd.read_csv(io.BytesIO(data), **PANDAS_OPTS).values.tolist()


def _sig_digits(text: str) -> int:
    mantissa = text.lstrip("-").split("e")[0].replace(".", "")
    return len(mantissa.lstrip("0")) or 1


@st.composite
def table(draw):
    width = draw(st.integers(1, 4))
    return draw(st.lists(st.lists(cell_text, min_size=width, max_size=width), max_size=5)), width


@settings(max_examples=300, deadline=None)
@given(table())
@example(([["a\rb", "x"]], 2))
@example(([["a\r\nb", "x"]], 2))
@example(([['a\\"b', "x"]], 2))
@example(([["  lead", "trail  "]], 2))
@example(([['é,"x"\\']], 1))
@example(([[""], ["\r"], ["\\"]], 1))
def test_csv_round_trip(tab):
    rows, width = tab
    header = [f"c{i}" for i in range(width)]
    data = csv_bytes(header, rows)
    assert read_csv_rows(data) == [header, *rows]
    if rows:
        frame = pd.read_csv(io.BytesIO(data), **PANDAS_OPTS)
        assert list(frame.columns) == header
        assert frame.values.tolist() == rows


def test_csv_stdlib_lone_cr_is_quoted():
    assert csv_bytes(["h"], [["a\rb"], ["a\\b"]]) == b'h\n"a\rb"\n"a\\\\b"\n'


def test_csv_cells():
    data = csv_bytes(
        ["b", "n", "i", "f", "g", "s"],
        [
            [True, None, 3, 0.1, float("nan"), "x"],
            [False, None, np.int64(-2), np.float32(0.5), -0.0, ""],
        ],
    )
    assert data == b"b,n,i,f,g,s\nTrue,,3,0.1,,x\nFalse,,-2,0.5,0,\n"


def test_csv_bad_row_and_type():
    with pytest.raises(ValueError):
        csv_bytes(["a", "b"], [["1"]])
    with pytest.raises(TypeError):
        csv_bytes(["a"], [[object()]])


finite = st.floats(allow_nan=False, allow_infinity=False)


@given(finite)
@example(1e-05)
@example(5e-324)
@example(1.7976931348623157e308)
@example(0.1 + 0.2)
def test_format_float(x):
    text = format_float(x)
    assert text is not None
    assert math.isclose(float(text), x, rel_tol=1e-9, abs_tol=0.0)
    assert _sig_digits(text) <= writers.FLOAT_SIG_DIGITS
    assert format_float(float(text)) == text


def test_format_float_specials():
    assert format_float(float("nan")) is None
    assert format_float(float("inf")) is None
    assert format_float(float("-inf")) is None
    assert format_float(-0.0) == "0"
    assert format_float(0.1 + 0.2) == "0.3"
    assert format_float(1e-05) == "1e-05"
    assert format_float(np.float64(2.5)) == "2.5"
    assert format_float(-1.7976931348623157e308) == "-1.797693134e+308"


json_scalars = st.none() | st.booleans() | st.integers() | finite | cell_text
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(cell_text, kids, max_size=4),
    max_leaves=20,
)


def _canon(value):
    if isinstance(value, float):
        return float(format_float(value))
    if isinstance(value, list):
        return [_canon(v) for v in value]
    if isinstance(value, dict):
        return {k: _canon(v) for k, v in value.items()}
    return value


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_json_round_trip(value):
    data = json_bytes(value)
    assert data.endswith(b"\n")
    assert data == json_bytes(value)
    loaded = json.loads(data.decode("utf-8"))
    assert loaded == _canon(value)
    if isinstance(value, dict):
        assert list(loaded) == list(value)


no_float_scalars = st.none() | st.booleans() | st.integers() | cell_text


@given(st.recursive(no_float_scalars, lambda kids: st.dictionaries(cell_text, kids, max_size=4)))
def test_json_layout_matches_stdlib(value):
    expected = json.dumps(value, indent=2, ensure_ascii=False) + "\n"
    assert json_bytes(value) == expected.encode("utf-8")


def test_json_layout():
    obj = {
        "z": 1,
        "a": {"topk": [["Berlin", 0.81], ["Paris", 0.1]], "nan": float("nan")},
        "rows": [{"x": (1, 2)}, {}],
        "empty": [],
        "t": np.int64(7),
        "f": np.float32(0.25),
    }
    assert json_bytes(obj).decode("utf-8") == (
        "{\n"
        '  "z": 1,\n'
        '  "a": {\n'
        '    "topk": [["Berlin", 0.81], ["Paris", 0.1]],\n'
        '    "nan": null\n'
        "  },\n"
        '  "rows": [\n'
        "    {\n"
        '      "x": [1, 2]\n'
        "    },\n"
        "    {}\n"
        "  ],\n"
        '  "empty": [],\n'
        '  "t": 7,\n'
        '  "f": 0.25\n'
        "}\n"
    )
    assert json_bytes([["a", 0.5], ["b", 0.25]]) == b'[["a", 0.5], ["b", 0.25]]\n'
    assert json_bytes({"é": "ü"}) == '{\n  "é": "ü"\n}\n'.encode()


def test_json_type_errors():
    with pytest.raises(TypeError, match="set"):
        json_bytes({"a": {1, 2}})
    with pytest.raises(TypeError, match="int"):
        json_bytes({1: "a"})


def test_write_atomic(tmp_path: Path):
    target = tmp_path / "out.json"
    write_atomic(target, b"one")
    assert target.read_bytes() == b"one"
    write_atomic(target, b"two\n")
    assert target.read_bytes() == b"two\n"
    assert os.listdir(tmp_path) == ["out.json"]


@pytest.mark.parametrize("broken", ["replace", "fsync"])
def test_write_atomic_failure_keeps_old(tmp_path: Path, monkeypatch, broken):
    target = tmp_path / "out.csv"
    target.write_bytes(b"old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(writers.os, broken, boom)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.csv"]
