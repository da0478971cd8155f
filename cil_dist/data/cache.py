"""The decoded cache: every training frame decoded once, one copy per node, mapped read-only.

The first process of a node that needs the cache builds it: it streams the shards with the
usual reader (any transport, checksums verified, :mod:`cil_dist.data.reading`), decodes each
sample, resizes it to ``data.resize`` (bilinear image, nearest label) and writes it once as raw
uint8 arrays. Every local rank then maps the same files read-only (``np.memmap``), so a node
holds one copy, in a tmpfs (``data.cache: memory``, ``/dev/shm`` by default) or on a local disk
(``data.cache: disk``, ``data.cache_dir``). Labels keep their raw Cityscapes ids: one cache
serves every stage and method of the same shards (the stage's look-up table is applied later).

Layout of ``<cache_dir>/<digest>/``::

    images.u8      (N, H, W, 3) uint8, raw
    labels.u8      (N, H, W) uint8 raw label ids
    keys.json      the N sample keys, in the files' row order
    complete.json  written last: format, digest, frame count and size

The digest covers every shard's SHA-256, sample count and byte size (sorted: the shards' order
and URLs do not matter), the resize and :data:`FORMAT`, so changed shards get a new cache.
Building happens under an ``fcntl`` lock in ``<digest>.building/``, renamed to ``<digest>/`` at
the end (atomic): a killed build leaves only a ``.building`` folder, which the next process
removes and rebuilds; a folder without a valid ``complete.json`` is never read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cil_dist.config import ConfigError, DataConfig
from cil_dist.data.manifest import ShardRef
from cil_dist.data.reading import ReadPolicy, ShardReadError, iter_shard
from cil_dist.data.transforms import decode_pair, resize_pair
from cil_dist.storage import StorageOptions

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the layout or the decoding changes: old caches are then not reused
MEMORY_DIR = "/dev/shm/cil-dist"  # data.cache=memory without data.cache_dir
RESERVE = 1 << 30  # MemAvailable kept free by a memory cache
IMAGES, LABELS, KEYS, COMPLETE = "images.u8", "labels.u8", "keys.json", "complete.json"


def human(size: float) -> str:
    """``12.3 GB`` (decimal units)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError  # pragma: no cover


def mem_available() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes (None where the kernel does not say)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass(frozen=True)
class CacheSpec:
    """What a cache holds (the shards, the frame size) and where it lives."""

    refs: tuple[ShardRef, ...]
    size: tuple[int, int]  # (w, h) of every frame: data.resize
    root: Path
    mode: str  # memory | disk
    digest: str

    @classmethod
    def of(cls, cfg: DataConfig, refs: Sequence[ShardRef]) -> CacheSpec:
        """The cache of ``refs`` (a manifest's shards) under the config's ``data.cache*``."""
        if any(ref.samples is None for ref in refs):
            raise ConfigError("data.cache: needs a manifest's sample counts (data.manifest)")
        size = (int(cfg.resize[0]), int(cfg.resize[1]))
        shards = sorted([ref.sha256 or "", ref.samples, ref.bytes or 0] for ref in refs)
        text = json.dumps({"format": FORMAT, "resize": list(size), "shards": shards})
        digest = hashlib.sha256(text.encode()).hexdigest()[:24]
        root = Path(cfg.cache_dir or MEMORY_DIR)
        return cls(tuple(refs), size, root, cfg.cache, digest)

    @property
    def frames(self) -> int:
        return sum(ref.samples for ref in self.refs)

    @property
    def bytes_needed(self) -> int:
        w, h = self.size
        return self.frames * w * h * 4  # 3 image bytes and 1 label byte per pixel

    @property
    def dir(self) -> Path:
        return self.root / self.digest

    @property
    def building(self) -> Path:
        return self.root / f"{self.digest}.building"

    @property
    def lock(self) -> Path:
        return self.root / f"{self.digest}.lock"

    def record(self) -> dict:
        """The content of ``complete.json``."""
        return {
            "format": FORMAT,
            "digest": self.digest,
            "frames": self.frames,
            "size": [*self.size],
        }


def is_complete(spec: CacheSpec) -> bool:
    """Whether ``spec.dir`` holds a finished cache of ``spec`` (marker and file sizes)."""
    try:
        record = json.loads((spec.dir / COMPLETE).read_text())
    except (OSError, ValueError):
        return False
    w, h = spec.size
    if record != spec.record():
        return False
    sizes = {IMAGES: spec.frames * w * h * 3, LABELS: spec.frames * w * h}
    try:
        return all((spec.dir / name).stat().st_size == want for name, want in sizes.items())
    except OSError:
        return False


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``fcntl`` lock on ``path``, released when the holder ends (even killed)."""
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process building the decoded cache (%s)", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def filesystem_type(path: Path) -> str | None:
    """The type of the file system holding ``path`` (``tmpfs``, ``ext4``…), from /proc/mounts."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    real, best, kind = os.path.realpath(path), "", None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, fields[2]
    return kind


def check_room(spec: CacheSpec) -> None:
    """Refuse (one line, naming the bytes needed) a cache that does not fit where it goes."""
    needed = spec.bytes_needed
    free = shutil.disk_usage(spec.root).free
    what = f"the decoded cache of {spec.frames} frames at {spec.size[0]}x{spec.size[1]}"
    if spec.mode == "disk":
        if needed > free:
            raise ConfigError(
                f"data.cache_dir: {spec.root} has {human(free)} free, {what} needs "
                f"{human(needed)} ({needed} bytes); choose a larger local folder or a smaller "
                "data.resize"
            )
        return
    kind = filesystem_type(spec.root)
    if kind not in (None, "tmpfs", "ramfs"):
        log.warning(
            "data.cache=memory: %s is on %s, not a tmpfs: the cache is written to that disk",
            spec.root,
            kind,
        )
    available = mem_available()
    room = free if available is None else min(free, available - RESERVE)
    if needed > room:
        memory = (
            "" if available is None else f", MemAvailable − 1 GiB is {human(available - RESERVE)}"
        )
        raise ConfigError(
            f"data.cache: memory: {what} needs {human(needed)} ({needed} bytes); {spec.root} "
            f"has {human(free)} free{memory}; use data.cache=disk with data.cache_dir=<a "
            "node-local folder, e.g. a local SSD>"
        )


def ensure(
    spec: CacheSpec,
    *,
    verify: bool = True,
    policy: ReadPolicy | None = None,
    options: StorageOptions | None = None,
    workers: int = 1,
) -> bool:
    """Make ``spec.dir`` a complete cache; True if this call built it (else it was there).

    Every local rank calls it: the first to get the lock builds, the others wait and find it
    complete. A leftover ``.building`` folder (a killed build) or an incomplete cache folder is
    removed and rebuilt.
    """
    try:
        spec.root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"data.cache_dir: cannot create {spec.root}: {exc}") from None
    with _locked(spec.lock):
        if is_complete(spec):
            log.info("decoded cache %s: complete, mapping it", spec.dir)
            return False
        for leftover in (spec.building, spec.dir):
            if leftover.exists():
                log.warning("decoded cache: removing the incomplete %s (a killed build)", leftover)
                shutil.rmtree(leftover)
        check_room(spec)
        _build(spec, verify, policy or ReadPolicy(), options or StorageOptions(), workers)
        os.rename(spec.building, spec.dir)
        return True


@dataclass(frozen=True)
class _ShardTask:
    folder: Path
    frames: int
    size: tuple[int, int]
    ref: ShardRef
    offset: int  # the shard's first row
    verify: bool
    policy: ReadPolicy
    options: StorageOptions


def _arrays(folder: Path, frames: int, size: tuple[int, int], mode: str):
    w, h = size
    images = np.memmap(folder / IMAGES, np.uint8, mode, shape=(frames, h, w, 3))
    labels = np.memmap(folder / LABELS, np.uint8, mode, shape=(frames, h, w))
    return images, labels


def _fill_shard(task: _ShardTask) -> list[str]:
    """Decode one shard into its rows of the cache; returns its sample keys in row order."""
    images, labels = _arrays(task.folder, task.frames, task.size, "r+")
    ref, keys = task.ref, []
    for sample in iter_shard(ref, task.verify, task.policy, task.options):
        if len(keys) == ref.samples:
            raise ShardReadError(ref.url, keys[-1], f"holds more than {ref.samples} samples")
        image, label = resize_pair(*decode_pair(sample), task.size)
        row = task.offset + len(keys)
        images[row], labels[row] = np.asarray(image), label
        keys.append(sample["__key__"])
    if len(keys) != ref.samples:
        last = keys[-1] if keys else None
        raise ShardReadError(ref.url, last, f"holds {len(keys)} samples, manifest {ref.samples}")
    images.flush()
    labels.flush()
    return keys


def _worker_init() -> None:
    """Preemption signals are the training process's business (as the DataLoader workers')."""
    for name in ("SIGUSR2", "SIGUSR1", "SIGTERM"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def _build(
    spec: CacheSpec, verify: bool, policy: ReadPolicy, options: StorageOptions, workers: int
) -> None:
    start = time.perf_counter()
    log.info(
        "building the decoded cache: %d frames of %d shards at %dx%d, %s, into %s",
        spec.frames,
        len(spec.refs),
        *spec.size,
        human(spec.bytes_needed),
        spec.building,
    )
    spec.building.mkdir()
    _arrays(spec.building, spec.frames, spec.size, "w+")  # creates both files (sparse)
    policy = ReadPolicy(policy.retries, policy.backoff, "fail")  # every frame or no cache
    offsets = np.cumsum([0] + [ref.samples for ref in spec.refs[:-1]])
    tasks = [
        _ShardTask(spec.building, spec.frames, spec.size, ref, int(offset), verify, policy, options)
        for ref, offset in zip(spec.refs, offsets, strict=True)
    ]
    workers = min(workers, len(tasks))
    if workers <= 1:
        keys = [_fill_shard(task) for task in tasks]
    else:
        context = multiprocessing.get_context("fork")  # the shard reader is fork-safe
        pool = ProcessPoolExecutor(workers, context, initializer=_worker_init)
        try:
            keys = list(pool.map(_fill_shard, tasks))
        finally:  # a failed shard: the shards not started are not read
            pool.shutdown(cancel_futures=True)
    rows = [key for shard in keys for key in shard]
    (spec.building / KEYS).write_text(json.dumps(rows))
    for name in (IMAGES, LABELS, KEYS):
        with (spec.building / name).open("rb+") as handle:
            os.fsync(handle.fileno())
    (spec.building / COMPLETE).write_text(json.dumps(spec.record()))
    log.info("decoded cache built in %.1f s", time.perf_counter() - start)


@dataclass(frozen=True)
class DecodedFrames:
    """A complete cache mapped read-only; rows addressed in sample-key order."""

    images: np.ndarray  # (N, H, W, 3) uint8 memmap, file row order
    labels: np.ndarray  # (N, H, W) uint8 raw label ids
    keys: tuple[str, ...]  # sorted
    rows: np.ndarray  # rows[i]: the file row of keys[i]
    digest: str = ""  # of the shards and resize (CacheSpec.digest)

    @classmethod
    def open(cls, folder: Path | str) -> DecodedFrames:
        folder = Path(folder)
        record = json.loads((folder / COMPLETE).read_text())  # missing: never half-written
        images, labels = _arrays(folder, record["frames"], tuple(record["size"]), "r")
        file_keys = json.loads((folder / KEYS).read_text())
        rows = np.argsort(np.asarray(file_keys), kind="stable")
        keys = tuple(file_keys[r] for r in rows)
        return cls(images, labels, keys, rows, str(record["digest"]))

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def size(self) -> tuple[int, int]:
        """(w, h) of every frame."""
        return int(self.images.shape[2]), int(self.images.shape[1])

    def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Images (B, H, W, 3), raw labels (B, H, W) and keys of the samples ``indices``
        (positions in key order), copied out of the mapping."""
        rows = self.rows[indices]
        return self.images[rows], self.labels[rows], [self.keys[i] for i in indices]
