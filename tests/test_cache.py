"""The decoded cache on the tiny shards: exact frames, one build per node (real processes), a
new cache for changed shards, killed builds rebuilt, room refusal through the real CLI, global
batches that do not depend on the world size, mid-epoch resume and a 2-rank gloo run that
follows the 1-rank run."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cil_dist.config import ConfigError, DataConfig
from cil_dist.data.cache import (
    RESERVE,
    CacheSpec,
    DecodedFrames,
    check_room,
    ensure,
    filesystem_type,
    is_complete,
    mem_available,
)
from cil_dist.data.cached_loader import build_cached_loader
from cil_dist.data.global_order import GlobalOrder, epoch_permutation
from cil_dist.data.pipeline import ShardSource
from cil_dist.data.reading import iter_shard
from cil_dist.data.transforms import decode_pair, resize_pair
from cil_dist.distributed import DistEnv, cleanup_distributed, init_distributed
from cil_dist.protocol import TaskProtocol
from cil_dist.training import checkpoint as ckpt
from cil_dist.training import config_diff, run_folder
from tests.helpers import error_lines, run_ranks, tiny_train_config

BIN = Path(sys.executable).parent
SIZE = [64, 32]  # frames are resized from the shards' 128x64: the resize is exercised


def cache_config(manifest: str, folder: Path, **changes) -> DataConfig:
    fields = {"resize": SIZE, "cache": "disk", "cache_dir": str(folder)} | changes
    return DataConfig(manifest=manifest, **fields)


def task1_spec(manifest: str, folder: Path) -> CacheSpec:
    return CacheSpec.of(
        cache_config(manifest, folder), ShardSource.from_manifest(manifest, "task1").refs
    )


def test_the_cache_holds_exactly_the_decoded_and_resized_frames(manifest_path, tmp_path):
    spec = task1_spec(manifest_path, tmp_path)
    assert ensure(spec, workers=2)  # two build processes
    frames = DecodedFrames.open(spec.dir)
    assert len(frames) == spec.frames == 8 and frames.size == (64, 32)
    assert list(frames.keys) == sorted(frames.keys)
    assert not frames.images.flags.writeable
    expected = {}
    for ref in spec.refs:
        for sample in iter_shard(ref):
            image, label = resize_pair(*decode_pair(sample), tuple(SIZE))
            expected[sample["__key__"]] = (np.asarray(image), label)
    assert set(frames.keys) == set(expected)
    images, labels, keys = frames.gather(np.arange(len(frames)))
    for image, label, key in zip(images, labels, keys, strict=True):
        np.testing.assert_array_equal(image, expected[key][0])
        np.testing.assert_array_equal(label, expected[key][1])
    assert not list(tmp_path.glob("*.building"))


def _ensure_in_a_rank(rank: int, manifest: str, folder: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    dist.barrier()  # both ask for the cache at the same moment
    try:
        built = ensure(task1_spec(manifest, Path(folder)), workers=1)
        Path(out, f"built{rank}").write_text(json.dumps(built))
    finally:
        dist.destroy_process_group()


def test_one_process_of_a_node_builds_the_others_map_it(manifest_path, tmp_path):
    folder = tmp_path / "cache"
    run_ranks(_ensure_in_a_rank, 2, manifest_path, str(folder), str(tmp_path))
    built = sorted(json.loads((tmp_path / f"built{r}").read_text()) for r in range(2))
    assert built == [False, True]  # concurrent: one built, the other waited and mapped it
    spec = task1_spec(manifest_path, folder)
    before = os.stat(spec.dir / "images.u8")
    code = (
        "import sys; from pathlib import Path; from tests.test_cache import task1_spec;"
        "from cil_dist.data.cache import ensure;"
        "print(ensure(task1_spec(sys.argv[1], Path(sys.argv[2]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, manifest_path, str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stdout.strip() == "False"  # a later process maps it too
    after = os.stat(spec.dir / "images.u8")
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_changed_shards_get_a_new_cache_moved_or_reordered_ones_the_same(manifest_path, tmp_path):
    spec = task1_spec(manifest_path, tmp_path)
    refs = spec.refs
    cfg = cache_config(manifest_path, tmp_path)
    moved = [dataclasses.replace(ref, url=f"s3://elsewhere/{i}.tar") for i, ref in enumerate(refs)]
    assert CacheSpec.of(cfg, list(reversed(moved))).digest == spec.digest
    changed = [dataclasses.replace(refs[0], sha256="0" * 64), *refs[1:]]
    more = ShardSource.from_manifest(manifest_path, ["task1", "task2"]).refs
    resized = cache_config(manifest_path, tmp_path, resize=[32, 16])
    digests = {
        CacheSpec.of(cfg, changed).digest,
        CacheSpec.of(cfg, more).digest,
        CacheSpec.of(resized, refs).digest,
        spec.digest,
    }
    assert len(digests) == 4
    assert ensure(spec)
    bigger = CacheSpec.of(cfg, more)
    assert ensure(bigger) and len(DecodedFrames.open(bigger.dir)) == 8 + 14
    assert is_complete(spec) and not ensure(spec)  # the first one is still there


def test_a_killed_build_is_removed_and_rebuilt_never_read(manifest_path, tmp_path):
    spec = task1_spec(manifest_path, tmp_path)
    # a build killed before its rename: a half-written .building folder
    spec.building.mkdir(parents=True)
    (spec.building / "images.u8").write_bytes(b"\x07" * 100)
    (spec.building / "keys.json").write_text('["half"]')
    # and a cache folder without its completion marker (copied by hand, interrupted)
    spec.dir.mkdir()
    (spec.dir / "images.u8").write_bytes(b"\x07" * 100)
    assert not is_complete(spec)
    with pytest.raises(FileNotFoundError):
        DecodedFrames.open(spec.dir)  # an incomplete cache is not opened
    assert ensure(spec)
    assert not spec.building.exists() and is_complete(spec)
    frames = DecodedFrames.open(spec.dir)
    assert "half" not in frames.keys and len(frames) == 8
    # a marker that does not match the files (truncated images) is not complete either
    with (spec.dir / "images.u8").open("rb+") as handle:
        handle.truncate(10)
    assert not is_complete(spec) and ensure(spec) and is_complete(spec)


def test_a_build_killed_by_sigkill_is_rebuilt(manifest_path, tmp_path):
    """A real build process killed while it writes (its lock dies with it)."""
    spec = task1_spec(manifest_path, tmp_path)
    code = (
        "import sys, time; from pathlib import Path; import cil_dist.data.cache as c;"
        "from tests.test_cache import task1_spec;"
        "fill = c._fill_shard;"
        "c._fill_shard = lambda task: (fill(task), print('wrote', flush=True), time.sleep(60))[0];"
        "c.ensure(task1_spec(sys.argv[1], Path(sys.argv[2])))"
    )
    builder = subprocess.Popen(
        [sys.executable, "-c", code, manifest_path, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert builder.stdout.readline().strip() == "wrote"  # one shard written, mid-build
        assert spec.building.is_dir() and not spec.dir.exists()
    finally:
        builder.kill()
        builder.wait()
    assert ensure(spec) and is_complete(spec) and not spec.building.exists()
    assert len(DecodedFrames.open(spec.dir)) == 8


def tiny_yaml(folder: Path, manifest: str, **data) -> Path:
    cfg = tiny_train_config(manifest, folder / "runs", name="room")
    container = OmegaConf.structured(cfg)
    container.data = OmegaConf.merge(container.data, data)
    path = folder / "train.yaml"
    path.write_text(OmegaConf.to_yaml(container))
    return path


def the_one_error_of_cil_train(config) -> str:
    """``cil train --config config`` ends with exit code 2 and one ERROR line, no traceback."""
    done = subprocess.run(
        [BIN / "cil", "train", "--config", config], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = error_lines(done.stderr)
    assert len(errors) == 1, done.stderr
    return errors[0]


def test_a_cache_that_does_not_fit_is_refused_in_one_line(manifest_path, tmp_path):
    config = tiny_yaml(
        tmp_path,
        manifest_path,
        cache="memory",
        cache_dir=str(tmp_path / "cache"),
        resize=[400000, 200000],
    )
    expected = (
        r"ERROR cil: data\.cache: memory: the decoded cache of 8 frames at 400000x200000 needs "
        r"2\.6 TB \(2560000000000 bytes\); .*cache has .* free, MemAvailable − 1 GiB is .*; "
        r"use data\.cache=disk with data\.cache_dir="
    )
    errors = [the_one_error_of_cil_train(config)]
    assert re.search(expected, errors[0]), errors[0]
    assert not list((tmp_path / "cache").glob("*.building"))


def test_a_memory_cache_must_fit_in_memory_available_a_disk_cache_on_the_disk(
    manifest_path, tmp_path
):
    spec = task1_spec(manifest_path, tmp_path)  # on a disk
    disk = r"data\.cache_dir: .* has .* free, the decoded cache of 8 frames at 400000x200000"
    with pytest.raises(ConfigError, match=rf"{disk} needs 2\.6 TB \(2560000000000 bytes\)"):
        check_room(dataclasses.replace(spec, size=(400000, 200000)))
    assert filesystem_type(Path("/proc/self")) == "proc"  # memory on a non-tmpfs: a warning
    available, free = mem_available(), shutil.disk_usage(tmp_path).free
    needed = available - RESERVE + 10**9  # over MemAvailable − 1 GiB by 1 GB
    if needed >= free:
        pytest.skip("the test folder's disk is smaller than the memory")
    width, frames = 1000, 8
    height = -(-needed // (4 * width * frames))
    spec = dataclasses.replace(spec, size=(width, height))
    with pytest.raises(ConfigError, match=r"needs .*MemAvailable − 1 GiB is .*data\.cache=disk"):
        check_room(dataclasses.replace(spec, mode="memory"))
    check_room(spec)  # the same cache fits on the disk


def test_a_corrupt_shard_fails_the_build_in_one_line_and_leaves_nothing_to_read(
    shard_dir, tmp_path
):
    shards = tmp_path / "shards"
    shutil.copytree(shard_dir, shards)
    broken = shards / "task1" / "task1-000001.tar"
    broken.write_bytes(broken.read_bytes()[:-3000])  # truncated in its last sample
    cache = tmp_path / "cache"
    config = tiny_yaml(
        tmp_path, str(shards / "manifest.json"), cache="disk", cache_dir=str(cache)
    )  # two build processes (the default): the error crosses from one of them
    errors = [the_one_error_of_cil_train(config)]
    assert f"ERROR cil: shard {broken}: " in errors[0], errors
    left = [p.name for p in cache.iterdir() if not p.name.endswith(".lock")]
    assert len(left) == 1 and left[0].endswith(".building"), left  # the next build removes it


def test_cache_settings_are_validated_in_one_line():
    cases = [
        (dict(cache="ram"), r"data\.cache: expected one of none, memory, disk, got 'ram'"),
        (dict(cache="disk"), r"data\.cache_dir: data\.cache=disk needs a node-local folder"),
        (dict(cache="memory", cache_build_workers=0), r"data\.cache_build_workers: must be >= 1"),
        (dict(cache="memory", manifest="", shards=["a.tar"]),
         r"data\.cache: memory needs data\.manifest"),
    ]  # fmt: skip
    for changes, message in cases:
        cfg = dataclasses.replace(DataConfig(manifest="m.json"), **changes)
        with pytest.raises(ConfigError, match=message):
            cfg.validate()
    assert config_diff.is_free("data.cache_dir") and config_diff.is_free("data.cache_build_workers")
    assert not config_diff.is_free("data.cache")


def test_the_epoch_permutation_is_a_pure_function_of_seed_and_epoch():
    first = epoch_permutation(3, 1, 50)
    assert sorted(first) == list(range(50))
    np.testing.assert_array_equal(first, epoch_permutation(3, 1, 50))
    assert not np.array_equal(first, epoch_permutation(3, 2, 50))
    assert not np.array_equal(first, epoch_permutation(4, 1, 50))
    order = GlobalOrder(50, 6, 3)
    assert order.steps == 8 and list(order.batch(first, 1)) == list(first[6:12])
    assert [order.rank_slice(r, 3) for r in range(3)] == [slice(0, 2), slice(2, 4), slice(4, 6)]


def joint_lut() -> np.ndarray:
    return TaskProtocol.load("cityscapes_cil").joint_lut()


def global_batches(manifest: str, folder: Path, world: int, epoch: int, start: int = 0):
    """Per global step: the keys, augmented crops and labels of every rank, concatenated."""
    cfg = cache_config(manifest, folder, global_batch_size=6)
    cfg.augment.crop = [48, 24]
    source = ShardSource.from_manifest(manifest, ["task1", "task2", "task3"])
    loaders = [
        build_cached_loader(cfg, source, joint_lut(), DistEnv(rank, world), seed=5)
        for rank in range(world)
    ]
    steps = []
    for loader in loaders:
        loader.set_epoch(epoch, start)
    for parts in zip(*loaders, strict=True):
        keys = [key for part in parts for key in part["key"]]
        moved = [loaders[0].to_device(part, "cpu") for part in parts]
        images = torch.cat([image for image, _ in moved])
        labels = torch.cat([label for _, label in moved])
        steps.append((keys, images, labels))
    assert len(steps) == len(loaders[0]) - start
    return steps


def test_global_batches_are_the_same_for_one_two_and_three_ranks(manifest_path, tmp_path):
    one = global_batches(manifest_path, tmp_path, 1, epoch=2)
    assert len(one) == 34 // 6
    seen = [key for keys, _, _ in one for key in keys]
    assert len(set(seen)) == len(seen) == 30  # each sample at most once per epoch
    for world in (2, 3):
        other = global_batches(manifest_path, tmp_path, world, epoch=2)
        for (keys, images, labels), (keys2, images2, labels2) in zip(one, other, strict=True):
            assert keys == keys2
            torch.testing.assert_close(images, images2, rtol=0, atol=0)  # same crops and jitter
            assert torch.equal(labels, labels2)
    assert one[0][1].shape == (6, 3, 24, 48) and one[0][2].dtype == torch.int64
    assert int(one[0][2].max()) < 19 or int(one[0][2].max()) == 255
    # another epoch: another order; a start step jumps straight there
    assert [k for k, _, _ in global_batches(manifest_path, tmp_path, 1, epoch=3)] != [
        k for k, _, _ in one
    ]
    resumed = global_batches(manifest_path, tmp_path, 2, epoch=2, start=3)
    assert [k for k, _, _ in resumed] == [k for k, _, _ in one[3:]]
    torch.testing.assert_close(resumed[0][1], one[3][1], rtol=0, atol=0)


def test_a_mid_epoch_checkpoint_on_the_cache_resumes_with_identical_weights(
    manifest_path, tmp_path
):
    from cil_dist.training.train import run_training
    from tests.test_train import assert_same_final

    def config(name: str):
        cfg = tiny_train_config(manifest_path, tmp_path, name=name, method="joint")
        cfg.data.cache, cfg.data.cache_dir = "memory", str(tmp_path / "cache")
        cfg.data.global_batch_size = 4
        cfg.optim.epochs, cfg.checkpoint.every_steps, cfg.checkpoint.keep = 2, 5, 20
        return cfg

    whole = run_training(config("whole"))
    # 34 samples in global batches of 4: 8 steps per epoch; step 10 is the 2nd of epoch 2
    mid = run_folder.periodic_path(tmp_path / "whole", 1, 2)
    assert ckpt.load_checkpoint(mid)["state"] == {
        "epoch": 1, "step": 10, "epoch_step": 2, "samples": 40
    }  # fmt: skip
    interrupted = tmp_path / "interrupted" / "checkpoints"
    interrupted.mkdir(parents=True)
    shutil.copy(mid, interrupted)  # "preempted" in the middle of epoch 2
    resumed = run_training(config("interrupted"))
    assert_same_final(whole, resumed)

    # a mid-epoch checkpoint written on other shards (another cache) is not resumed at its step
    payload = ckpt.load_checkpoint(mid)
    assert payload["sampler"]["order"] == "global" and payload["sampler"]["samples"] == 34
    payload["sampler"]["cache"] = "0" * 24
    payload.pop("format")
    other = tmp_path / "other" / "checkpoints"
    ckpt.save_checkpoint(other / mid.name, **payload)
    with pytest.raises(
        ConfigError,
        match=r"epoch_0001_step_000002\.pt: a mid-epoch checkpoint "
        r"\(epoch 2, step 2\) of another sample order: .*'cache': '0{24}'",
    ):
        run_training(config("other"))


def _train_beside_a_slow_build(rank: int, manifest: str, out: str) -> None:
    """Rank 0's node has its cache; rank 1's builds it, slowly, past dist.timeout_s."""
    import time

    import cil_dist.data.cache as cache
    from cil_dist.training.train import run_training

    cfg = tiny_train_config(manifest, Path(out), name="skew", method="joint")
    cfg.data.cache, cfg.data.cache_dir = "disk", str(Path(out) / f"node{rank}")
    cfg.data.global_batch_size, cfg.data.cache_build_workers = 6, 1
    cfg.dist.timeout_s, cfg.checkpoint.every_epochs = 2.0, 0
    if rank == 1:
        fill = cache._fill_shard
        cache._fill_shard = lambda task: (time.sleep(0.5), fill(task))[1]  # 12 shards: 6 s
    run_training(cfg)


def test_a_node_building_its_cache_does_not_time_out_a_node_that_has_one(manifest_path, tmp_path):
    cfg = tiny_train_config(manifest_path, tmp_path, method="joint")
    cfg.data.cache, cfg.data.cache_dir = "disk", str(tmp_path / "node0")
    refs = ShardSource.from_manifest(manifest_path, ["task1", "task2", "task3"]).refs
    assert ensure(CacheSpec.of(cfg.data, refs))  # rank 0's node: built before the job
    run_ranks(_train_beside_a_slow_build, 2, manifest_path, str(tmp_path))
    assert (tmp_path / "skew" / "checkpoints" / "final.pt").is_file()


def _losses_of_a_run(rank: int, manifest: str, out: str) -> None:
    """Four steps of a joint run (global batch 6, SyncBatchNorm, dropout on); the global loss
    of every step (the ranks' mean) into ``out/world{W}.json``. In float64: in float32 the
    ranks' other summation order alone moves Adam's first steps by ~1e-3 (see
    tests/test_global_batch.py), which would hide an error of the distributed step."""
    from cil_dist.distributed import all_reduce_sum
    from cil_dist.training.train import build, train_step

    env = DistEnv.from_environment()
    init_distributed(env)
    try:
        torch.set_num_threads(1)
        torch.set_default_dtype(torch.float64)  # the model; the augmentation's output follows
        cfg = tiny_train_config(manifest, Path(out), name="loss", method="joint")
        cfg.data.cache, cfg.data.cache_dir = "disk", str(Path(out) / "cache")
        cfg.data.global_batch_size, cfg.model.sync_batchnorm = 6, True
        cfg.model.channels_last = False
        parts = build(cfg, env)
        parts.student.train()
        parts.loader.set_epoch(0)
        losses = []
        for _, batch in zip(range(4), parts.loader, strict=False):
            figures = train_step(parts, cfg, batch, env)
            losses.append(all_reduce_sum([float(figures[0])], env)[0] / env.world_size)
        if env.is_main:
            Path(out, f"world{env.world_size}.json").write_text(json.dumps(losses))
    finally:
        cleanup_distributed()


def test_two_gloo_ranks_follow_the_one_rank_loss_per_step(manifest_path, tmp_path):
    run_ranks(_losses_of_a_run, 1, manifest_path, str(tmp_path))
    run_ranks(_losses_of_a_run, 2, manifest_path, str(tmp_path))
    one, two = (json.loads((tmp_path / f"world{w}.json").read_text()) for w in (1, 2))
    assert len(one) == len(two) == 4
    assert one[0] != one[-1]  # it trains
    np.testing.assert_allclose(two, one, rtol=1e-9)


def test_fewer_cached_samples_than_one_global_batch_is_the_trainers_one_rule(
    manifest_path, tmp_path
):
    """The cached loader refuses a batch its samples cannot fill with the words of the shard
    stream and the chain validation (``DataConfig.batches_per_epoch``)."""
    cfg = cache_config(manifest_path, tmp_path, global_batch_size=10)
    source = ShardSource.from_manifest(manifest_path, "task1")  # 8 samples
    expected = "data.global_batch_size: 8 training samples, fewer than 2 ranks × batch 5"
    with pytest.raises(ConfigError) as caught:
        build_cached_loader(cfg, source, joint_lut(), DistEnv(0, 2), seed=5)
    assert str(caught.value) == expected
