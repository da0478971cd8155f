"""The files of a run folder: its checkpoints (``RUN/checkpoints/epoch_0010.pt`` …,
``final.pt``) and its curves (``RUN/metrics.csv``). Paths and file names only, no torch: the
launcher and the chain reports read run folders without importing it."""

from __future__ import annotations

import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

FINAL = "final.pt"
# after N epochs (and S steps into the next one: checkpoint.every_steps)
PERIODIC = re.compile(r"epoch_(\d{4,})(?:_step_(\d{6,}))?\.pt$")
METRICS_CSV = "metrics.csv"  # the validation curves and loss parts (cil_dist.training.validation)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def periodic_path(run_dir: str | Path, epoch: int, epoch_step: int = 0) -> Path:
    """The checkpoint after ``epoch`` epochs and ``epoch_step`` steps of the next one."""
    step = f"_step_{epoch_step:06d}" if epoch_step else ""
    return checkpoint_dir(run_dir) / f"epoch_{epoch:04d}{step}.pt"


def _progress(path: Path) -> tuple[int, int]:
    match = PERIODIC.search(path.name)
    return int(match.group(1)), int(match.group(2) or 0)


def final_path(run_dir: str | Path) -> Path:
    return checkpoint_dir(run_dir) / FINAL


def periodic_checkpoints(run_dir: str | Path) -> list[Path]:
    """Periodic checkpoints of a run, oldest first."""
    folder = checkpoint_dir(run_dir)
    found = (
        [p for p in folder.glob("epoch_*.pt") if PERIODIC.search(p.name)] if folder.is_dir() else []
    )
    return sorted(found, key=_progress)


def resume_candidates(run_dir: str | Path) -> list[Path]:
    """``final.pt`` (if any), then the periodic checkpoints, newest first."""
    final = final_path(run_dir)
    return ([final] if final.is_file() else []) + periodic_checkpoints(run_dir)[::-1]


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes that never finished (a killed job)."""
    folder = checkpoint_dir(run_dir)
    stale = sorted(folder.glob(".*.pt.*.tmp")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d unfinished checkpoint write(s) in %s", len(stale), folder)
    return stale


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` periodic checkpoints."""
    for old in periodic_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
