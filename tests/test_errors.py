"""The one-line form of an exception that lens shows users."""

from __future__ import annotations

import pytest

from lens.errors import LensError, first_line


@pytest.mark.parametrize("exc,expected", [
    (ValueError("bad value\nTraceback details\nmore"), "ValueError: bad value"),
    (OSError("  padded first line  \nsecond"), "OSError: padded first line"),
    (RuntimeError(""), "RuntimeError"),
    (KeyError("k"), "KeyError: 'k'"),
])
def test_first_line_keeps_the_type_and_the_first_line(exc, expected):
    assert first_line(exc) == expected


def test_lens_error_is_one_line():
    assert str(LensError("a\n  b\tc")) == "a b c"
