"""Rank-aware logging: rank 0 logs at INFO, other ranks at WARNING, each line tagged."""

from __future__ import annotations

import logging
import sys


def setup_logging(rank: int = 0, level: int = logging.INFO) -> None:
    """Configure the root logger once per process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if rank == 0 else max(level, logging.WARNING))
