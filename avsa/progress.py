"""What long work shows: progress bars that suit a terminal and a log alike."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

LOG_REDRAW_S = 30.0


def is_terminal(stream: Any = None) -> bool:
    """Whether `stream` (default stderr) is a terminal, where output redraws in place."""
    stream = sys.stderr if stream is None else stream
    tty = getattr(stream, "isatty", None)
    return bool(tty and tty())


def progress_bar(total: int, desc: str, unit: str, *, enabled: bool = True,
                 stream: Any = None) -> tqdm:
    """A progress bar on `stream` (default stderr). On a terminal it redraws in place; in a log
    (a pipe, a file, `ray job submit`) every redraw is kept, so there it redraws at most every
    LOG_REDRAW_S seconds, and once at the end."""
    stream = sys.stderr if stream is None else stream
    return tqdm(total=total, desc=desc, unit=unit, file=stream, disable=not enabled,
                mininterval=0.1 if is_terminal(stream) else LOG_REDRAW_S)
