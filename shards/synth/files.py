"""Writing the Cityscapes tree: one job per frame, the rare-class schedule, atomic PNG writes
and :func:`generate`, which runs the jobs over worker processes."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from cil_dist.protocol import TaskProtocol
from shards.synth.frame import _city_key, render_frame

log = logging.getLogger(__name__)

#: Rare classes appear in one frame out of ``period`` of every city (with a per-city phase).
RARE_PERIODS: dict[str, int] = {"train": 3, "bus": 2, "truck": 2, "motorcycle": 2}


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate` wrote."""

    root: Path
    frames: dict[str, int] = field(default_factory=dict)  # split -> number of frames
    size: tuple[int, int] = (1024, 512)  # width, height
    seed: int = 0

    @property
    def total(self) -> int:
        return sum(self.frames.values())


@dataclass(frozen=True)
class _Job:
    root: str
    split: str
    city: str
    index: int
    size: tuple[int, int]
    seed: int
    rare: frozenset[str]


def frame_name(city: str, index: int) -> str:
    """Frame stem of the ``index``-th frame of ``city``, e.g. ``aachen_000000_000019``."""
    return f"{city}_{0:06d}_{19 + 20 * index:06d}"


def generate(
    out: str | Path,
    protocol: TaskProtocol,
    images_per_city: int = 10,
    size: tuple[int, int] = (1024, 512),
    seed: int = 0,
    workers: int | None = None,
) -> SynthSummary:
    """Write ``images_per_city`` synthetic frames for every city of ``protocol.city_sets()``."""
    width, height = (int(v) for v in size)
    if images_per_city < 1:
        raise ValueError(f"images_per_city must be >= 1, got {images_per_city}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if width < 16 or height < 8:
        raise ValueError(f"size must be at least 16x8 (width x height), got {width}x{height}")
    root = Path(out)
    jobs = _jobs(root, protocol, images_per_city, (width, height), seed)
    for split, city in {(job.split, job.city) for job in jobs}:
        for kind in ("leftImg8bit", "gtFine"):
            (root / kind / split / city).mkdir(parents=True, exist_ok=True)
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    start = time.perf_counter()
    if workers <= 1:
        for job in jobs:
            _write_frame(job)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_write_frame, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    frames: dict[str, int] = {}
    for job in jobs:
        frames[job.split] = frames.get(job.split, 0) + 1
    summary = SynthSummary(root, frames, (width, height), seed)
    log.info(
        "wrote %d synthetic frames (%s) of %dx%d to %s in %.1f s with %d worker(s)",
        summary.total,
        ", ".join(f"{k}: {v}" for k, v in sorted(frames.items())),
        width,
        height,
        root,
        time.perf_counter() - start,
        workers,
    )
    return summary


def _jobs(
    root: Path, protocol: TaskProtocol, images_per_city: int, size: tuple[int, int], seed: int
) -> list[_Job]:
    pairs = dict.fromkeys(
        (cs.split, city) for cs in protocol.city_sets().values() for city in cs.cities
    )
    jobs = []
    for split, city in pairs:
        schedule = _rare_schedule(seed, city, images_per_city)
        jobs += [
            _Job(str(root), split, city, i, size, seed, schedule[i]) for i in range(images_per_city)
        ]
    return jobs


def _rare_schedule(seed: int, city: str, count: int) -> list[frozenset[str]]:
    """Which rare classes each frame of a city shows: one frame in ``period``, per-city phase."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _city_key(city), 0]))
    phases = {name: int(rng.integers(period)) for name, period in RARE_PERIODS.items()}
    return [
        frozenset(n for n, p in RARE_PERIODS.items() if (i + phases[n]) % p == 0)
        for i in range(count)
    ]


def _write_frame(job: _Job) -> None:
    frame = render_frame(job.size, job.seed, job.city, job.index, job.rare)
    stem = frame_name(job.city, job.index)
    root = Path(job.root)
    gt = root / "gtFine" / job.split / job.city / f"{stem}_gtFine"
    img_path = root / "leftImg8bit" / job.split / job.city / f"{stem}_leftImg8bit.png"
    _save_png(frame.image, img_path, compress_level=1)  # noisy photo: barely compressible
    _save_png(frame.label_ids, Path(f"{gt}_labelIds.png"), compress_level=6)
    _save_png(frame.instance_ids, Path(f"{gt}_instanceIds.png"), compress_level=6)
    _save_png(frame.color, Path(f"{gt}_color.png"), compress_level=6)


def _save_png(array: np.ndarray, path: Path, compress_level: int) -> None:
    """Write atomically: readers never see a half-written frame."""
    part = path.with_name(path.name + ".part")
    Image.fromarray(array).save(part, format="PNG", compress_level=compress_level)
    os.replace(part, path)
