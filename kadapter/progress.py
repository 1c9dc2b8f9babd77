"""Progress bars that suit where the output goes.

On a terminal, ``progress(...)`` is an ordinary tqdm bar. When the stream is not a
terminal (a log file, CI) it is the same tqdm object printing one plain line every
``KADAPTER_PROGRESS_SECONDS`` seconds (default 30), plus one at the start and one at the
end: no carriage-return redraws, so a log holds a few lines per step instead of
megabytes of redrawn bars. Processes other than the main one of a distributed launch
show none.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

from tqdm import tqdm

INTERVAL_ENV = "KADAPTER_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0


def line_interval() -> float:
    """Seconds between plain progress lines (``KADAPTER_PROGRESS_SECONDS``, default 30)."""
    raw = os.environ.get(INTERVAL_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_INTERVAL
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV} must be a number of seconds, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{INTERVAL_ENV} must be >= 0, got {raw!r}")
    return value


class LineProgress(tqdm):
    """tqdm writing whole lines at most every ``interval`` seconds (and at the end)."""

    def __init__(self, *args: Any, interval: float, **kwargs: Any):
        self._interval = interval
        self._last_line = -math.inf
        self._last_text = ""
        self._final = False
        super().__init__(*args, mininterval=interval, miniters=1, ncols=0, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is not None:  # tqdm clearing its line: nothing was drawn in place
            return False
        now = time.monotonic()
        if not self._final and now - self._last_line < self._interval:
            return True
        self._last_line = now
        text = self.__str__().strip()
        if text != self._last_text:  # the end line repeats no line already written
            self._last_text = text
            self.fp.write(text + "\n")
            self.fp.flush()
        return True

    def close(self) -> None:
        if not self.disable:
            self._final = True
            self.display()
            self.leave = False  # the final line is written; tqdm itself adds nothing
        super().close()


def progress(iterable: Any = None, *, desc: str, total: float | None = None, unit: str = "it",
             disable: bool = False, file: Any = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on a terminal, plain timed lines elsewhere (see the module docstring).
    Only the main process of a distributed launch (``RANK`` 0 or unset) shows progress."""
    disable = disable or os.environ.get("RANK", "0") != "0"
    stream = file if file is not None else sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, file=stream,
                    dynamic_ncols=True, **kwargs)
    return LineProgress(iterable, desc=desc, total=total, unit=unit, disable=disable,
                        file=stream, interval=line_interval(), **kwargs)


def progress_chunks(chunks: Any, *, desc: str, unit: str = "row", total: int | None = None,
                    disable: bool = False):
    """Yield ``(first, rows)`` chunks unchanged, counting their rows on a progress bar."""
    with progress(desc=desc, unit=unit, total=total, disable=disable) as bar:
        for first, rows in chunks:
            yield first, rows
            bar.update(len(rows))
