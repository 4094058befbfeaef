"""Progress bars for long work (train, evaluate, embed, prepare, downloads): one place decides how they look.

On a terminal a bar redraws in place. When stderr is a file (a batch job's log), each redraw
is a new line, so the bar is redrawn at most every ``FILE_SECONDS`` seconds: a log gets a line
every minute or so with the total and the ETA, not one per update.
"""
from __future__ import annotations

import sys

from tqdm import tqdm

# Seconds between progress lines when stderr is not a terminal.
FILE_SECONDS = 60.0


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)`` writing to stderr, redrawn at most every ``FILE_SECONDS`` when
    stderr is not a terminal (a caller's own ``mininterval`` wins)."""
    stream = kwargs.setdefault("file", sys.stderr)
    if not _is_terminal(stream):
        kwargs.setdefault("mininterval", FILE_SECONDS)
        kwargs.setdefault("maxinterval", max(FILE_SECONDS, kwargs["mininterval"]))
        kwargs.setdefault("dynamic_ncols", False)
        kwargs.setdefault("ncols", 100)
    return tqdm(iterable, **kwargs)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real stream
        return False
