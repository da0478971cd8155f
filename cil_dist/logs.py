"""Rank-aware logging: rank 0 logs at INFO, other ranks at WARNING, each line tagged."""

from __future__ import annotations

import logging
import sys


class CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at emit time (survives stream swaps, e.g. pytest's)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        """Ignored: logging.StreamHandler assigns it; the stream is always sys.stderr."""


def setup_logging(rank: int = 0, level: int = logging.INFO) -> None:
    """Configure the root logger once per process."""
    handler = CurrentStderrHandler()
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if rank == 0 else max(level, logging.WARNING))
