"""Pack a Cityscapes tree (real or synthetic) into webdataset shards plus ``manifest.json``.

Per city set of the task protocol (``task1``…, ``heldout``, ``val``) the frames are sorted by
key and cut into shards of ``samples_per_shard``: ``OUT/{set}/{set}-{i:06d}.tar`` with members
``KEY.image.png`` (or ``.image.jpg``), ``KEY.label.png`` (raw label ids, lossless) and
``KEY.meta.json``. Labels stay raw so the same shards serve every stage; the stage's look-up
table is applied when reading. Images are resized to ``size``; so are the labels of the
training sets, while the ``val`` set keeps its labels at their source resolution by default
(``val_labels="full"``): the paper scores the 1024x512 input's predictions, upsampled, against
the full-resolution 2048x1024 labels, as the official Cityscapes evaluation does. The stored
label size is recorded in every sample's ``meta.json`` and per set in the manifest.

Everything cheap is validated before the first byte is written; every shard is written through
a temporary file and renamed into place (an object store commits an object when its upload
completes), so a failure never leaves half a shard. ``out`` may be a folder or a URL
(``s3://bucket/prefix``, ``gs://…``): shards are uploaded first, the manifest last. Shards are
packed in parallel (all cores) and byte-identical for identical inputs; a re-run skips shards
whose recipe (keys, source-file digests, packing parameters) and checksum still match.

A re-pack never touches a shard the previous manifest references: a changed shard whose plain
name is taken goes to ``{set}-{i:06d}-{recipe[:12]}.tar``, the new manifest replaces the old in
one step (a rename; one PUT on an object store), and only then are the shards it no longer
references deleted (files named like this dataset's shards, nothing else). Until that step the
previous dataset stays complete and verifies. Worker processes die with the packing process
(Linux: ``PR_SET_PDEATHSIG``), so killing ``cil-shards pack`` leaves none behind.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import io
import json
import logging
import os
import re
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm
from webdataset import TarWriter

from cil_dist import labels, storage, urls
from cil_dist.data.manifest import VERSION, Manifest, ShardRecord, SplitRecord
from cil_dist.digest import ContentDigest
from cil_dist.protocol import CitySet, TaskProtocol

log = logging.getLogger(__name__)

# The paper's task 1 (4 cities, ~700 frames) then has ~44 shards, enough for many ranks ×
# DataLoader workers, and a 1024x512 PNG shard stays around 15 MB.
DEFAULT_SAMPLES_PER_SHARD = 16
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
#: ``val_labels``: keep the val set's labels at their source size, or resize them to ``size``.
VAL_LABEL_MODES = ("full", "resized")
#: The city set whose labels ``val_labels`` concerns (the evaluation set of every protocol).
EVAL_SET = "val"
#: Hex digits of the recipe in the name of a shard re-packed while its plain name is taken.
RECIPE_TAG = 12
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class PackError(ValueError):
    """Bad input for packing; names the file (and sample key) at fault."""


@dataclass(frozen=True)
class Frame:
    key: str
    city: str
    split: str
    image: Path
    label: Path


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: everything a worker process needs, picklable."""

    set_name: str
    index: int
    frames: tuple[Frame, ...]
    root: Path
    out: str
    size: tuple[int, int]
    image_format: str
    jpeg_quality: int
    full_labels: bool = False  # labels stay at their source size (the val set by default)

    @property
    def file(self) -> str:
        """The shard's plain name (its name unless the previous manifest holds that name)."""
        return shard_file(self.set_name, self.index)


def shard_file(set_name: str, index: int, recipe: str = "") -> str:
    """``{set}/{set}-{index:06d}.tar``, with ``-{recipe[:12]}`` before ``.tar`` if given."""
    tag = f"-{recipe[:RECIPE_TAG]}" if recipe else ""
    return f"{set_name}/{set_name}-{index:06d}{tag}.tar"


def shard_name_pattern(set_name: str) -> re.Pattern[str]:
    """File names (within the set's folder) of a set's shards, plain or recipe-tagged."""
    name = re.escape(set_name)
    return re.compile(rf"{name}-(?P<index>\d{{6}})(?:-[0-9a-f]{{{RECIPE_TAG}}})?\.tar")


@dataclass(frozen=True)
class ShardTask:
    """A job plus what the previous manifest says about its place (picklable)."""

    job: ShardJob
    previous: ShardRecord | None  # the previous manifest's shard of this set and index
    plain_taken: bool  # the previous manifest references the plain name: write elsewhere


@dataclass(frozen=True)
class PreviousPack:
    """The shards of the manifest a re-pack replaces (empty when there is none)."""

    records: dict[tuple[str, int], ShardRecord]  # by (set, index)
    files: frozenset[str]  # every shard file it references
    sets: frozenset[str]  # its city sets (each a folder of ``out``)

    def task(self, job: ShardJob) -> ShardTask:
        previous = self.records.get((job.set_name, job.index))
        return ShardTask(job, previous, job.file in self.files)


@dataclass
class PackResult:
    manifest: Manifest
    manifest_url: str
    written: int
    skipped: int
    seconds: float


def find_frames(root: Path, set_name: str, split: str, cities: tuple[str, ...]) -> list[Frame]:
    """The frames of a city set, sorted by key; every image must have its label."""
    if not cities:
        raise PackError(f"city set {set_name!r} lists no cities")
    frames = []
    for city in cities:
        folder = root / "leftImg8bit" / split / city
        if not folder.is_dir():
            raise PackError(f"city set {set_name!r}: city {city!r} has no folder {folder}")
        for image in sorted(folder.glob(f"*{IMAGE_SUFFIX}")):
            key = image.name[: -len(IMAGE_SUFFIX)]
            label = root / "gtFine" / split / city / f"{key}{LABEL_SUFFIX}"
            if not label.is_file():
                raise PackError(f"{image}: label file missing, expected {label}")
            frames.append(Frame(key, city, split, image, label))
    if not frames:
        raise PackError(
            f"city set {set_name!r} ({', '.join(cities)}): no *{IMAGE_SUFFIX} under "
            f"{root / 'leftImg8bit' / split}"
        )
    return sorted(frames, key=lambda f: f.key)


def file_digest(path: Path) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def recipe_of(job: ShardJob) -> str:
    """Digest of everything that determines the shard's bytes."""
    digest = hashlib.sha256()
    labels_at = "source" if job.full_labels else "size"
    params = [VERSION, job.size, job.image_format, job.jpeg_quality, labels_at]
    digest.update(json.dumps(params).encode())
    for frame in job.frames:
        digest.update(f"{frame.key}:{file_digest(frame.image)}:{file_digest(frame.label)}".encode())
    return digest.hexdigest()


def _encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if fmt == "jpg":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def load_pair(frame: Frame, root: Path) -> tuple[Image.Image, np.ndarray]:
    """Decode and validate one frame's image and label ids."""
    try:
        image = Image.open(frame.image)
        image.load()
    except Exception as exc:
        raise PackError(f"{frame.image} (key {frame.key}): cannot read image: {exc}") from exc
    try:
        label_image = Image.open(frame.label)
        ids = np.asarray(label_image)
    except Exception as exc:
        raise PackError(f"{frame.label} (key {frame.key}): cannot read label: {exc}") from exc
    try:
        ids = labels.checked_label_ids(ids, label_image.mode)
    except ValueError as exc:
        raise PackError(f"{frame.label} (key {frame.key}): {exc}") from exc
    if image.size != (ids.shape[1], ids.shape[0]):
        raise PackError(
            f"{frame.image} is {image.size[0]}x{image.size[1]} but {frame.label} is "
            f"{ids.shape[1]}x{ids.shape[0]} (key {frame.key})"
        )
    return image.convert("RGB"), ids


def sample_of(frame: Frame, job: ShardJob) -> dict:
    image, ids = load_pair(frame, job.root)
    original = image.size
    if image.size != job.size:
        image = image.resize(job.size, Image.BILINEAR)
        if not job.full_labels:
            ids = np.asarray(Image.fromarray(ids).resize(job.size, Image.NEAREST))
    meta = {
        "key": frame.key,
        "city": frame.city,
        "split": frame.split,
        "set": job.set_name,
        "source_image": str(frame.image.relative_to(job.root)),
        "source_label": str(frame.label.relative_to(job.root)),
        "original_size": list(original),
        "size": list(job.size),
        "label_size": [ids.shape[1], ids.shape[0]],
    }
    return {
        "__key__": frame.key,
        f"image.{job.image_format}": _encode(image, job.image_format, job.jpeg_quality),
        "label.png": _encode(Image.fromarray(ids, "L"), "png", 0),
        "meta.json": json.dumps(meta, sort_keys=True).encode(),
    }


def write_shard(
    job: ShardJob, recipe: str, file: str, options: storage.StorageOptions | None = None
) -> ShardRecord:
    """Pack one shard as ``file`` (runs in a worker process) and return its manifest record."""
    url = urls.join(job.out, file)
    with storage.open_for_write(url, options=options) as stream:
        hashing = _HashingWriter(stream)
        with TarWriter(hashing, mtime=0, user="cil", group="cil", mode=0o444) as writer:
            for frame in job.frames:
                writer.write(sample_of(frame, job))
    content = hashing.content
    return ShardRecord(file, len(job.frames), content.size, content.sha256, recipe)


class _HashingWriter:
    """Write-through wrapper that hashes and counts bytes."""

    def __init__(self, stream):
        self.stream, self.content = stream, ContentDigest()

    def write(self, data: bytes) -> int:
        self.content.update(data)
        return self.stream.write(data)

    def flush(self) -> None:
        self.stream.flush()


def pack_job(
    task: ShardTask, options: storage.StorageOptions | None = None
) -> tuple[ShardRecord, bool]:
    """Write a shard unless its previous record still matches; returns (record, written).

    A shard is never rewritten under a name the previous manifest references (that dataset
    must stay valid until the new manifest replaces it): it then gets its recipe in its name.
    ``options``: how the output store is reached (the packing process's, sent with the task).
    """
    job, previous = task.job, task.previous
    recipe = recipe_of(job)
    if previous is not None and previous.recipe == recipe:
        url = urls.join(job.out, previous.file)
        unchanged = (previous.sha256, previous.bytes)
        if storage.exists(url, options) and storage.sha256_of(url, options) == unchanged:
            return previous, False
    file = shard_file(job.set_name, job.index, recipe) if task.plain_taken else job.file
    return write_shard(job, recipe, file, options), True


def previous_pack(out: str, options: storage.StorageOptions | None = None) -> PreviousPack:
    """The shards of an existing manifest in ``out`` (empty if none or unreadable)."""
    empty = PreviousPack({}, frozenset(), frozenset())
    url = urls.join(out, "manifest.json")
    if not storage.exists(url, options):
        return empty
    try:
        manifest = Manifest.load(url, options)
    except ValueError as exc:
        log.warning("ignoring unreadable previous manifest %s: %s", urls.redact_url(url), exc)
        return empty
    records = {}
    for set_name, split in manifest.splits.items():
        pattern = shard_name_pattern(set_name)
        for shard in split.shards:
            folder, _, name = shard.file.rpartition("/")
            match = pattern.fullmatch(name)
            if folder == set_name and match:
                records[(set_name, int(match["index"]))] = shard
    files = frozenset(s.file for rec in manifest.splits.values() for s in rec.shards)
    sets = frozenset(name for name in manifest.splits if re.fullmatch(r"\w[\w-]*", name))
    return PreviousPack(records, files, sets)  # sets: folder names only, never "../x"


def source_label_size(frames: list[Frame], set_name: str) -> tuple[int, int]:
    """The one size (w, h) of the source labels of ``frames``; PackError if they differ
    (evaluation batches full-resolution labels, so they must share a size)."""
    sizes: dict[tuple[int, int], Path] = {}
    for frame in frames:
        try:
            with Image.open(frame.label) as label:
                sizes.setdefault(label.size, frame.label)
        except Exception as exc:
            raise PackError(f"{frame.label} (key {frame.key}): cannot read label: {exc}") from exc
    if len(sizes) > 1:
        (a, path_a), (b, path_b) = list(sizes.items())[:2]
        raise PackError(
            f"city set {set_name!r}: {path_a} is {a[0]}x{a[1]} but {path_b} is {b[0]}x{b[1]}; "
            "full-resolution labels must share one size (use --val-labels resized)"
        )
    return next(iter(sizes))


@dataclass(frozen=True)
class PackPlan:
    """What :func:`pack` writes: the city sets, their stored label sizes and the shard jobs."""

    sets: dict[str, CitySet]
    label_sizes: dict[str, tuple[int, int]]
    jobs: list[ShardJob]


def plan_jobs(
    root: Path,
    out: str,
    protocol: TaskProtocol,
    size: tuple[int, int],
    per_shard: int,
    fmt: str,
    quality: int,
    val_labels: str = "full",
) -> PackPlan:
    """All shard jobs per city set, after validating that every set has its frames."""
    plan = PackPlan({}, {}, [])
    for set_name, city_set in protocol.city_sets().items():
        frames = find_frames(root, set_name, city_set.split, city_set.cities)
        full = set_name == EVAL_SET and val_labels == "full"
        plan.sets[set_name] = city_set
        plan.label_sizes[set_name] = source_label_size(frames, set_name) if full else size
        for index, start in enumerate(range(0, len(frames), per_shard)):
            chunk = tuple(frames[start : start + per_shard])
            plan.jobs.append(ShardJob(set_name, index, chunk, root, out, size, fmt, quality, full))
    return plan


def is_leftover(name: str, pattern: re.Pattern[str]) -> bool:
    """A shard file of the set, or the temporary file of one an interrupted pack left behind."""
    if pattern.fullmatch(name):
        return True
    tmp = re.fullmatch(r"\.(?P<shard>.+\.tar)\.[A-Za-z0-9_]+\.tmp", name)  # open_for_write's
    return bool(tmp and pattern.fullmatch(tmp["shard"]))


def remove_unreferenced(
    out: str, set_names: set[str], keep: set[str], options: storage.StorageOptions | None = None
) -> int:
    """Delete the shards of ``set_names`` in ``out`` that are not in ``keep`` (files relative
    to ``out``), and stray temporary shards; other files are left alone. Returns the count."""
    removed = 0
    for set_name in sorted(set_names):
        pattern = shard_name_pattern(set_name)
        fs, folder = storage.filesystem(urls.join(out, set_name), options)
        for name in listing(fs, folder.rstrip("/")):
            if is_leftover(name, pattern) and f"{set_name}/{name}" not in keep:
                fs.rm_file(f"{folder.rstrip('/')}/{name}")
                removed += 1
    return removed


def listing(fs, folder: str) -> list[str]:
    """File names in ``folder`` as the store has them now (worker processes wrote there, so
    no listing cached in this process is used or kept); empty if there is no such folder."""
    fs.invalidate_cache(folder)
    try:
        return [path.rstrip("/").rsplit("/", 1)[-1] for path in fs.ls(folder, detail=False)]
    except FileNotFoundError:
        return []
    finally:
        fs.invalidate_cache(folder)


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this (worker) process once ``parent`` exits, however it exits
    (Linux ``prctl(PR_SET_PDEATHSIG)``; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def init_worker(parent: int) -> None:
    """Worker set-up: die with the packing process."""
    die_with_parent(parent)


def run_tasks(
    tasks: list[ShardTask], workers: int, options: storage.StorageOptions | None = None
) -> list[tuple[ShardRecord, bool]]:
    """``pack_job`` over ``tasks`` in ``workers`` processes, in order; on a failure the jobs not
    yet started are cancelled (the error is raised once the running ones end). ``options`` (the
    S3 endpoint) travel to the workers with every task."""
    pool = ProcessPoolExecutor(workers, initializer=init_worker, initargs=(os.getpid(),))
    job = functools.partial(pack_job, options=options)
    try:
        with tqdm(total=len(tasks), desc="packing shards", unit="shard", disable=None) as bar:
            results = []
            for result in pool.map(job, tasks):
                results.append(result)
                bar.update(1)
        return results
    finally:  # after a failure this drops the jobs not yet started
        pool.shutdown(wait=True, cancel_futures=True)


def pack(
    cityscapes_root: str | Path,
    out: str,
    protocol: TaskProtocol,
    size: tuple[int, int] = (1024, 512),
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    image_format: str = "png",
    jpeg_quality: int = 95,
    workers: int | None = None,
    val_labels: str = "full",
    options: storage.StorageOptions | None = None,
) -> PackResult:
    """Pack ``cityscapes_root`` into shards under ``out``; returns the manifest and counts.

    ``val_labels``: ``"full"`` keeps the val set's labels at their source resolution (the
    paper's evaluation), ``"resized"`` resizes them to ``size`` like the training sets'.
    ``options``: how an object-storage ``out`` is reached (its S3 endpoint; None: defaults).
    """
    start = time.perf_counter()
    root = Path(cityscapes_root)
    out = str(out)
    if image_format not in ("png", "jpg"):
        raise PackError(f"--image-format: expected png or jpg, got {image_format!r}")
    if val_labels not in VAL_LABEL_MODES:
        raise PackError(f"--val-labels: expected full or resized, got {val_labels!r}")
    if samples_per_shard < 1:
        raise PackError(f"--samples-per-shard: must be >= 1, got {samples_per_shard}")
    if not (root / "leftImg8bit").is_dir():
        raise PackError(f"{root}: not a Cityscapes root (no leftImg8bit folder)")
    plan = plan_jobs(
        root, out, protocol, tuple(size), samples_per_shard, image_format, jpeg_quality, val_labels
    )
    jobs = plan.jobs
    previous = previous_pack(out, options)
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    results = run_tasks([previous.task(job) for job in jobs], workers, options)
    records = {job.file: record for job, (record, _) in zip(jobs, results, strict=True)}
    written = sum(was_written for _, was_written in results)
    splits = {}
    for set_name, city_set in plan.sets.items():
        shards = [records[j.file] for j in jobs if j.set_name == set_name]
        label_size = plan.label_sizes[set_name]
        splits[set_name] = SplitRecord(city_set.split, list(city_set.cities), shards, label_size)
    manifest = Manifest(
        resolution=tuple(size),
        image_format=image_format,
        source=str(root.resolve()),
        task_config=protocol.to_dict(),
        splits=splits,
    )
    manifest_url = urls.join(out, "manifest.json")
    # after the shards, in one step: the switch to the new dataset
    manifest.save(manifest_url, options)
    manifest.url = manifest_url
    keep = {shard.file for record in splits.values() for shard in record.shards}
    removed = remove_unreferenced(out, set(splits) | previous.sets, keep, options)  # only now
    seconds = time.perf_counter() - start
    log.info(
        "packed %d shards (%d written, %d unchanged, %d old removed) of %d samples into %s "
        "in %.1f s",
        len(jobs),
        written,
        len(jobs) - written,
        removed,
        sum(len(j.frames) for j in jobs),
        urls.redact_url(out),
        seconds,
    )
    return PackResult(manifest, manifest_url, written, len(jobs) - written, seconds)
