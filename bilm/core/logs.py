"""bilm's messages: the ``bilm`` logger, shown by the CLI on rank 0 only.

Under torchrun every rank runs the same code; rather than guard each message with
``if env.is_main``, code logs to ``log`` and the CLI's handler drops records from other
ranks. Library callers get standard logging: configure the ``bilm`` logger to see them.
"""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("bilm")


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time of the message (not the stream it was
    created with: a caller that swaps stdout, as pytest's capture does, keeps the messages)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Messages to stdout, bare, from rank 0 (``RANK`` as torchrun sets it; 0 without torchrun);
    once per process."""
    if log.handlers:
        return
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    main_rank = os.environ.get("RANK", "0") == "0"
    handler.addFilter(lambda record: main_rank)
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
