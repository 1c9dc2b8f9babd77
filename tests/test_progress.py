"""Progress where the output is not a terminal: plain timed lines, no redraws."""

from __future__ import annotations

import io

import pytest

from kadapter.progress import LineProgress, progress


def test_non_terminal_progress_is_plain_lines(monkeypatch):
    monkeypatch.setenv("KADAPTER_PROGRESS_SECONDS", "0")
    stream = io.StringIO()
    bar = progress(total=4, desc="score", unit="query", file=stream)
    assert isinstance(bar, LineProgress)
    for _ in range(4):
        bar.update()
        bar.set_postfix(loss="0.5")
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].startswith("score:   0% 0/4") and lines[-1].startswith("score: 100% 4/4")
    assert len(lines) == len(set(lines))  # the end line is not written twice


def test_lines_are_rate_limited(monkeypatch):
    monkeypatch.setenv("KADAPTER_PROGRESS_SECONDS", "3600")
    stream = io.StringIO()
    for _ in progress(range(1000), desc="tokenize", file=stream):
        pass
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("tokenize: 100% 1000/1000")


def test_terminal_gets_a_tqdm_bar_and_bad_interval_is_an_error(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = progress(total=2, desc="t", file=stream)
    assert not isinstance(bar, LineProgress)
    bar.update(2)
    bar.close()
    assert "\r" in stream.getvalue()
    other_rank = io.StringIO()
    monkeypatch.setenv("RANK", "1")
    progress(total=2, desc="t", file=other_rank).close()
    assert other_rank.getvalue() == ""  # only the main process reports
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("KADAPTER_PROGRESS_SECONDS", "soon")
    with pytest.raises(ValueError, match="KADAPTER_PROGRESS_SECONDS must be a number"):
        progress(total=1, desc="x", file=io.StringIO())
