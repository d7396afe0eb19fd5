"""Tests for lens.windows: the rolling window of top-1 ids used by the copy rule."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lens.windows import RollingWindow


@settings(max_examples=150, deadline=None)
@given(k=st.integers(1, 6), pushes=st.lists(st.integers(-5, 50_000), max_size=25))
@example(k=1, pushes=[])
@example(k=1, pushes=[4, 4, 5])
@example(k=3, pushes=[1, 2])
@example(k=3, pushes=[1, 2, 3, 4])
def test_window_holds_the_last_k_pushed_ids(k, pushes):
    window = RollingWindow(k)
    reference: list[int] = []
    assert len(window) == 0
    for token_id in pushes:
        reference.append(token_id)
        content = window.push(token_id)
        assert isinstance(content, tuple)
        assert content == tuple(reference[-k:])
        assert len(content) <= k
        assert len(window) == len(content) == min(len(reference), k)
    assert window.k == k


def test_push_converts_ids_to_plain_ints():
    torch = pytest.importorskip("torch")
    window = RollingWindow(2)
    content = window.push(torch.tensor(7))
    content = window.push(3)
    assert content == (7, 3)
    assert all(type(i) is int for i in content)


def test_returned_content_is_a_snapshot():
    window = RollingWindow(2)
    first = window.push(1)
    window.push(2)
    window.push(3)
    assert first == (1,)


def test_windows_do_not_share_state():
    a, b = RollingWindow(2), RollingWindow(2)
    a.push(1)
    a.push(2)
    assert b.push(9) == (9,)
    assert len(a) == 2


@pytest.mark.parametrize("k", [0, -1, -100])
def test_window_size_below_one_is_rejected(k):
    with pytest.raises(ValueError, match="at least 1"):
        RollingWindow(k)
