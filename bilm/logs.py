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


class MainRankOnly(logging.Filter):
    """Passes records only in the process of rank 0 (``RANK`` as torchrun sets it; 0 without torchrun)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return os.environ.get("RANK", "0") == "0"


def setup_logging(level: int = logging.INFO) -> None:
    """Messages to stdout, bare, from rank 0 (once per process)."""
    if any(isinstance(h, logging.StreamHandler) and getattr(h, "_bilm", False) for h in log.handlers):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(MainRankOnly())
    handler._bilm = True
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
