"""Packing: plain webdataset tars, byte-identical, incremental, and clear errors on bad input."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset
from PIL import Image

from cil_dist.data.manifest import Manifest, ManifestError
from cil_dist.protocol import TaskProtocol
from shards import cli as shards_cli
from shards.pack import PackError, pack
from shards.verify import verify_manifest
from tests.conftest import TINY_SIZE

SMALL = TaskProtocol.from_dict(
    {
        "name": "small",
        "tasks": [
            {"id": 1, "classes": ["road", "sky"], "cities": ["aachen"]},
            {"id": 2, "classes": ["car"], "cities": ["bochum", "bremen"]},
        ],
        "val": {"split": "val", "cities": ["lindau"]},
        "eval_task_sets": {"12": [1, 2]},
    }
)


def write_frame(root: Path, split: str, city: str, index: int, seed: int, size=(32, 16)):
    rng = np.random.default_rng(seed)
    key = f"{city}_000000_{index:06d}"
    image_dir, label_dir = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
        image_dir / f"{key}_leftImg8bit.png"
    )
    ids = rng.choice([0, 7, 23, 26, 11], (size[1], size[0])).astype(np.uint8)
    Image.fromarray(ids).save(label_dir / f"{key}_gtFine_labelIds.png")
    return key


def make_small_tree(root: Path, seed: int = 0) -> Path:
    """3 frames of 32x16 in each city of ``SMALL`` (``seed`` varies every frame)."""
    for order, (split, city) in enumerate(
        [("train", "aachen"), ("train", "bochum"), ("train", "bremen"), ("val", "lindau")]
    ):
        for index in range(3):
            write_frame(root, split, city, index, seed + order * 10 + index)
    return root


@pytest.fixture
def small_tree(tmp_path) -> Path:
    return make_small_tree(tmp_path / "cityscapes")


def test_round_trip_with_vanilla_webdataset_and_tar(small_tree, tmp_path):
    out = tmp_path / "shards"
    result = pack(small_tree, str(out), SMALL, size=(32, 16), samples_per_shard=2, workers=2)
    manifest = Manifest.load(str(out / "manifest.json"))
    assert {n: r.samples for n, r in manifest.splits.items()} == {"task1": 3, "task2": 6, "val": 3}
    assert [s.samples for s in manifest.splits["task2"].shards] == [2, 2, 2]
    assert result.written == 7 and manifest.task_config == SMALL.to_dict()
    listing = subprocess.run(
        ["tar", "tf", str(out / "task1" / "task1-000000.tar")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert listing == [
        f"aachen_000000_00000{i}.{m}"
        for i in range(2)
        for m in ("image.png", "label.png", "meta.json")
    ]
    urls = [str(out / s.file) for s in manifest.splits["task2"].shards]
    samples = list(webdataset.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 6
    for sample in samples:
        city = sample["__key__"].split("_")[0]
        source = small_tree / "gtFine" / "train" / city / f"{sample['__key__']}_gtFine_labelIds.png"
        decoded = np.asarray(Image.open(io.BytesIO(sample["label.png"])))
        np.testing.assert_array_equal(decoded, np.asarray(Image.open(source)))


def test_shards_are_byte_identical_and_reruns_skip(small_tree, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    pack(small_tree, str(a), SMALL, size=(32, 16), samples_per_shard=2, workers=2)
    pack(small_tree, str(b), SMALL, size=(32, 16), samples_per_shard=2, workers=1)
    tars = sorted(p.relative_to(a) for p in a.rglob("*.tar"))
    assert tars and all((a / t).read_bytes() == (b / t).read_bytes() for t in tars)
    before = {t: (a / t).stat().st_mtime_ns for t in tars}
    again = pack(small_tree, str(a), SMALL, size=(32, 16), samples_per_shard=2)
    assert (again.written, again.skipped) == (0, len(tars))
    assert before == {t: (a / t).stat().st_mtime_ns for t in tars}
    write_frame(small_tree, "train", "bremen", 2, seed=999)  # changes one task2 shard
    changed = pack(small_tree, str(a), SMALL, size=(32, 16), samples_per_shard=2)
    assert changed.written == 1
    new = changed.manifest.splits["task2"].shards[2]
    assert new.file == f"task2/task2-000002-{new.recipe[:12]}.tar"  # its plain name was taken
    now = sorted(p.relative_to(a) for p in a.rglob("*.tar"))
    assert now == sorted([t for t in tars if t.name != "task2-000002.tar"] + [Path(new.file)])
    unchanged = [t for t in tars if t in now]
    assert {t: before[t] for t in unchanged} == {t: (a / t).stat().st_mtime_ns for t in unchanged}


def first_sample(shard: Path) -> dict:
    return next(iter(webdataset.WebDataset(str(shard), shardshuffle=False)))


def stored_sizes(out: Path, set_name: str, image: str = "image.png") -> tuple:
    """(image size, label size, meta.json's label_size) of a set's first sample."""
    manifest = Manifest.load(str(out / "manifest.json"))
    sample = first_sample(out / manifest.splits[set_name].shards[0].file)
    meta = json.loads(sample["meta.json"])
    return (
        Image.open(io.BytesIO(sample[image])).size,
        Image.open(io.BytesIO(sample["label.png"])).size,
        tuple(meta["label_size"]),
    )


def test_jpeg_option_and_resizing_keeps_val_labels_at_full_resolution(synth_root, tmp_path):
    out = tmp_path / "jpg"
    pack(synth_root, str(out), paper(), size=(64, 32), samples_per_shard=4, image_format="jpg")
    assert stored_sizes(out, "val", "image.jpg") == ((64, 32), TINY_SIZE, TINY_SIZE)
    assert stored_sizes(out, "task1", "image.jpg") == ((64, 32), (64, 32), (64, 32))
    manifest = Manifest.load(str(out / "manifest.json"))
    assert manifest.resolution == (64, 32)
    assert manifest.label_size("val") == TINY_SIZE
    assert {manifest.label_size(n) for n in manifest.splits if n != "val"} == {(64, 32)}


def test_val_labels_resized_option_and_repack_rewrites_only_val(synth_root, tmp_path, capsys):
    out = tmp_path / "shards"
    args = ["pack", "--cityscapes", str(synth_root), "--out", str(out), "--size", "64x32"]
    assert shards_cli.main([*args, "--val-labels", "resized", "--workers", "1"]) == 0
    assert stored_sizes(out, "val") == ((64, 32), (64, 32), (64, 32))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    result = pack(synth_root, str(out), paper(), size=(64, 32), workers=1)  # default: full
    kept = {p for p, t in before.items() if p.exists() and p.stat().st_mtime_ns == t}
    assert sorted({p.parent.name for p in set(before) - kept}) == ["val"]
    assert result.written == 1 and set(out.rglob("*.tar")) - kept == {
        out / s.file for s in result.manifest.splits["val"].shards
    }
    assert stored_sizes(out, "val") == ((64, 32), TINY_SIZE, TINY_SIZE)
    capsys.readouterr()
    assert shards_cli.main(["inspect", str(out / "manifest.json")]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^val\s+3\s+128x64\s", table, re.M), table
    assert re.search(r"^task1\s+4\s+64x32\s", table, re.M), table


def test_zero_samples_per_shard_is_refused_not_replaced(synth_root, tmp_path, capsys):
    args = ["pack", "--cityscapes", str(synth_root), "--out", str(tmp_path / "out")]
    assert shards_cli.main([*args, "--samples-per-shard", "0"]) == 2
    assert "--samples-per-shard: must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_bad_val_labels_option_is_a_usage_error(synth_root, tmp_path):
    args = ["pack", "--cityscapes", str(synth_root), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        shards_cli.main([*args, "--val-labels", "half"])
    assert exit_info.value.code == 2
    with pytest.raises(PackError, match=r"--val-labels: expected full or resized, got 'half'"):
        pack(synth_root, str(tmp_path / "out"), paper(), val_labels="half")


def test_full_resolution_val_labels_must_share_one_size(small_tree, tmp_path):
    write_frame(small_tree, "val", "lindau", 1, seed=5, size=(64, 32))
    out = tmp_path / "shards"
    with pytest.raises(
        PackError,
        match=r"lindau_000000_000000_gtFine_labelIds\.png is 32x16 but "
        r".*lindau_000000_000001_gtFine_labelIds\.png is 64x32.*--val-labels resized",
    ):
        pack(small_tree, str(out), SMALL, size=(32, 16), workers=1)
    assert not out.exists()
    pack(small_tree, str(out), SMALL, size=(32, 16), workers=1, val_labels="resized")
    assert Manifest.load(str(out / "manifest.json")).label_size("val") == (32, 16)


def paper() -> TaskProtocol:
    return TaskProtocol.load("cityscapes_cil")


def no_partial_files(out: Path) -> bool:
    return not [p for p in out.rglob("*") if p.is_file() and (".tmp" in p.name)]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda r: (r / "gtFine/train/bochum/bochum_000000_000001_gtFine_labelIds.png").unlink(),
            r"bochum_000000_000001_leftImg8bit\.png: label file missing.*gtFine_labelIds\.png",
        ),
        (
            lambda r: Image.fromarray(np.zeros((8, 8), np.uint8)).save(
                r / "gtFine/train/bremen/bremen_000000_000002_gtFine_labelIds.png"
            ),
            r"bremen_000000_000002_leftImg8bit\.png is 32x16 but .*labelIds\.png is 8x8",
        ),
        (
            lambda r: Image.fromarray(np.full((16, 32), 200, np.uint8)).save(
                r / "gtFine/train/bremen/bremen_000000_000001_gtFine_labelIds.png"
            ),
            r"bremen_000000_000001_gtFine_labelIds\.png \(key bremen_000000_000001\): label ids "
            r"\[200\]",
        ),
        (
            lambda r: shutil.rmtree(r / "leftImg8bit/train/aachen"),
            r"city set 'task1': city 'aachen' has no folder .*leftImg8bit/train/aachen",
        ),
        (
            lambda r: (
                r / "leftImg8bit/val/lindau/lindau_000000_000000_leftImg8bit.png"
            ).write_bytes(b"\x89PNG not really"),
            r"lindau_000000_000000_leftImg8bit\.png \(key lindau_000000_000000\): "
            r"cannot read image",
        ),
    ],
    ids=["missing-label", "size-mismatch", "bad-label-id", "missing-city", "corrupt-png"],
)
def test_bad_input_is_named_and_leaves_no_partial_shard(small_tree, tmp_path, damage, message):
    damage(small_tree)
    out = tmp_path / "shards"
    with pytest.raises(PackError, match=message):
        pack(small_tree, str(out), SMALL, size=(32, 16), samples_per_shard=2, workers=2)
    assert no_partial_files(out) if out.exists() else True
    assert not (out / "manifest.json").exists()


def test_bad_label_mid_shard_writes_no_tar_for_that_shard(small_tree, tmp_path):
    bad = small_tree / "gtFine/train/bochum/bochum_000000_000001_gtFine_labelIds.png"
    Image.fromarray(np.full((16, 32), 99, np.uint8)).save(bad)
    out = tmp_path / "shards"
    with pytest.raises(PackError, match=re.escape(str(bad))):
        pack(small_tree, str(out), SMALL, size=(32, 16), samples_per_shard=2, workers=1)
    assert not (out / "task2" / "task2-000000.tar").exists()
    assert no_partial_files(out)


def test_empty_city_set_is_an_error(tmp_path):
    root = tmp_path / "cityscapes"
    (root / "leftImg8bit" / "train" / "aachen").mkdir(parents=True)
    with pytest.raises(PackError, match=r"city set 'task1' \(aachen\): no \*_leftImg8bit\.png"):
        pack(root, str(tmp_path / "out"), SMALL, size=TINY_SIZE)


def test_manifest_label_size_defaults_to_resolution_and_is_checked(small_tree, tmp_path):
    out = tmp_path / "shards"
    pack(small_tree, str(out), SMALL, size=(32, 16), workers=1)
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["splits"]["val"]["label_size"] == [32, 16]
    del raw["splits"]["val"]["label_size"]  # a manifest written before label sizes existed
    assert Manifest.from_dict(raw).label_size("val") == (32, 16)
    raw["splits"]["val"]["label_size"] = [32]
    with pytest.raises(ManifestError, match=r"splits\.val\.label_size: expected \[width, height\]"):
        Manifest.from_dict(raw)


# --------------------------------------------------------------------------------- re-packing
VAL_IMAGE = "leftImg8bit/val/lindau/lindau_000000_000000_leftImg8bit.png"


def shard_files(out: Path) -> set[str]:
    """Every shard-like file under ``out`` (tars and temporaries), relative to ``out``."""
    return {str(p.relative_to(out)) for p in out.rglob("*") if ".tar" in p.name}


def referenced(manifest: Manifest) -> set[str]:
    return {s.file for rec in manifest.splits.values() for s in rec.shards}


def test_a_failed_repack_keeps_the_old_dataset_valid_and_a_good_one_switches(small_tree, tmp_path):
    """The re-pack changes every training shard, then fails on a corrupt val image after
    writing them: the old manifest must still verify. Fixed, the next re-pack switches and
    leaves exactly the new manifest's shards (and the user's own files)."""
    out = tmp_path / "shards"
    first = pack(small_tree, str(out), SMALL, size=(32, 16), samples_per_shard=2, workers=1)
    manifest = out / "manifest.json"
    old = manifest.read_bytes()
    (out / "task1" / "notes.txt").write_text("mine")
    (out / "task1" / "task1-backup.tar").write_bytes(b"mine too")
    make_small_tree(small_tree, seed=100)  # new pixels in every frame
    image = small_tree / VAL_IMAGE
    good = image.read_bytes()
    image.write_bytes(b"\x89PNG not really")  # the val set is packed last
    with pytest.raises(PackError, match=r"lindau_000000_000000_leftImg8bit\.png.*cannot read"):
        pack(small_tree, str(out), SMALL, size=(32, 16), samples_per_shard=2, workers=1)
    assert manifest.read_bytes() == old
    assert verify_manifest(str(manifest)) == []
    new_shards = shard_files(out) - referenced(first.manifest) - {"task1/task1-backup.tar"}
    written = [f for f in new_shards if not f.startswith("val/")]
    assert len(written) == 5, new_shards  # task1 and task2 were written before val failed

    image.write_bytes(good)
    second = pack(small_tree, str(out), SMALL, size=(32, 16), samples_per_shard=2, workers=1)
    assert (second.written, second.skipped) == (7, 0)
    assert verify_manifest(str(manifest)) == []
    assert shard_files(out) == referenced(second.manifest) | {"task1/task1-backup.tar"}
    assert not referenced(second.manifest) & referenced(first.manifest)
    assert (out / "task1" / "notes.txt").read_text() == "mine"


def children_of(pid: int) -> set[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    children = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.add(int(entry.name))
    return children


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie holds no memory)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PDEATHSIG")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_workers_die_with_a_killed_pack(synth_root, tmp_path, sig):
    """A real ``cil-shards pack`` with 3 workers (42 frames upscaled to 2048x1024, one per
    shard: many seconds of work); killing the parent must take every worker with it."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "shards.cli", "pack", "--cityscapes", str(synth_root)]
    argv += ["--out", str(out), "--size", "2048x1024", "--samples-per-shard", "1"]
    proc = subprocess.Popen([*argv, "--workers", "3"], stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    try:
        assert wait_for(lambda: len(children_of(proc.pid)) >= 3 or proc.poll() is not None, 30)
        workers = children_of(proc.pid)
        assert proc.poll() is None and len(workers) == 3, "pack ended before it was killed"
        os.kill(proc.pid, sig)
        assert proc.wait(10) == -sig
        assert wait_for(lambda: not any(map(running, workers)), 5), [
            pid for pid in workers if running(pid)
        ]
        assert not (out / "manifest.json").exists()
    finally:
        proc.kill()
        proc.wait()
        for pid in filter(running, workers):  # only on failure: leave no orphan behind
            os.kill(pid, signal.SIGKILL)
