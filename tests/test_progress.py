"""The one progress display (lens.progress): on a terminal only, never with --quiet."""

from __future__ import annotations

import io

import pytest

from lens.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_only_on_a_terminal():
    term = _Terminal()
    progress = Progress(stream=term, prefix="[1/2] m", interval=0)
    progress.show("load")
    progress.layer("pos/orig", 4, 4)
    progress.clear()
    assert "[1/2] m · pos/orig · layer 4/4" in term.getvalue()
    assert term.getvalue().endswith("\r\x1b[K")


@pytest.mark.parametrize("stream,quiet", [(io.StringIO, False), (_Terminal, True)])
def test_progress_is_silent_off_a_terminal_or_when_quiet(stream, quiet):
    out = stream()
    progress = Progress(stream=out, quiet=quiet)
    progress.show("collecting 1/2")
    progress.fact(1, 2, "a")
    progress.layer("y", 1, 2)
    progress.clear()
    assert out.getvalue() == ""


def test_fact_progress_shares_the_one_progress_line():
    term = _Terminal()
    progress = Progress(stream=term, prefix="m", interval=0)
    progress.fact(1, 2, "a")
    progress.layer("pos/orig", 3, 4)
    progress.fact(2, 2, "b")
    progress.clear()
    assert term.getvalue() == ("\r\x1b[Km · fact 1/2 (a)"
                               "\r\x1b[Km · fact 1/2 (a) · pos/orig · layer 3/4"
                               "\r\x1b[Km · fact 2/2 (b)\r\x1b[K")
