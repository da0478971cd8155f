"""The streaming reader: every rank/worker share, equal batch counts, exactly-once evaluation."""

from __future__ import annotations

import functools
import http.server
import shutil
import subprocess
import sys
import textwrap
import threading
from collections import Counter

import numpy as np
import pytest
import torch

from cil_dist.config import AugmentConfig, ConfigError, DataConfig
from cil_dist.data.manifest import Manifest
from cil_dist.data.pipeline import ShardSource, build_eval_loader, build_train_loader
from cil_dist.data.reading import ShardChecksumError, ShardReadError
from cil_dist.distributed import DistEnv
from tests.conftest import TINY_SIZE

CROP = [64, 32]


def data_config(manifest: str = "", workers: int = 2, batch: int = 2, **kw) -> DataConfig:
    return DataConfig(
        manifest=manifest,
        resize=list(TINY_SIZE),
        batch_size=batch,
        eval_batch_size=2,
        num_workers=workers,
        shuffle_buffer=4,
        augment=AugmentConfig(crop=list(CROP)),
        **kw,
    )


def eval_keys(cfg: DataConfig, source: ShardSource, world: int) -> Counter:
    seen = Counter()
    for rank in range(world):
        for batch in build_eval_loader(cfg, source, DistEnv(rank, world)):
            assert batch["image"].shape[1:] == (3, TINY_SIZE[1], TINY_SIZE[0])
            assert batch["label"].shape[1:] == (TINY_SIZE[1], TINY_SIZE[0])
            seen.update(batch["key"])
    return seen


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 2), (3, 1)])
@pytest.mark.parametrize("split", ["task1", "val"])
def test_evaluation_sees_every_sample_exactly_once(manifest_path, world, workers, split):
    manifest = Manifest.load(manifest_path)
    cfg = data_config(manifest_path, workers=workers)
    seen = eval_keys(cfg, ShardSource.from_manifest(manifest_path, split), world)
    assert sum(seen.values()) == manifest.splits[split].samples
    assert set(seen.values()) == {1}
    assert all(key.split("_")[0] in manifest.splits[split].cities for key in seen)


@pytest.mark.parametrize(("world", "workers"), [(1, 2), (2, 2), (3, 0), (4, 2)])
def test_training_gives_every_rank_the_same_number_of_full_batches(
    manifest_path, paper_protocol, world, workers
):
    cfg = data_config(manifest_path, workers=workers, batch=2)
    source = ShardSource.from_manifest(manifest_path, "task1")  # 8 samples in 3 uneven shards
    lut = paper_protocol.stage_lut(1)
    expected = 8 // (world * 2)
    for rank in range(world):
        loader = build_train_loader(cfg, source, lut, DistEnv(rank, world), seed=7)
        assert len(loader) == expected
        batches = list(loader)
        assert len(batches) == expected
        for batch in batches:
            assert batch["image"].shape == (2, 3, CROP[1], CROP[0])
            assert batch["image"].dtype == batch["label"].dtype == torch.uint8
            images, labels = loader.to_device(batch, "cpu")
            assert images.dtype == torch.float32 and labels.dtype == torch.int64
            assert batch["label"].shape == (2, CROP[1], CROP[0])
            assert set(batch["label"].unique().tolist()) <= set(range(5)) | {255}


def test_stage_labels_hold_only_the_stage_channels(manifest_path, paper_protocol):
    cfg = data_config(manifest_path, workers=0, batch=2)
    source = ShardSource.from_manifest(manifest_path, "task3")
    loader = build_train_loader(cfg, source, paper_protocol.stage_lut(3), DistEnv(), seed=1)
    values = set()
    for batch in loader:
        values |= set(batch["label"].unique().tolist())
    assert values <= set(range(11, 19)) | {255}
    assert values & set(range(11, 19)), "task-3 classes should be present"


def test_training_order_is_deterministic_and_changes_per_epoch(manifest_path, paper_protocol):
    cfg = data_config(manifest_path, workers=2, batch=1)
    source = ShardSource.from_manifest(manifest_path, ["task1", "task2"])
    lut = paper_protocol.joint_lut()

    def run(epoch: int) -> tuple[list[str], torch.Tensor]:
        loader = build_train_loader(cfg, source, lut, DistEnv(1, 2), seed=3)
        loader.set_epoch(epoch)
        batches = list(loader)
        return [k for b in batches for k in b["key"]], torch.cat([b["image"] for b in batches])

    keys0, images0 = run(0)
    keys0_again, images0_again = run(0)
    keys1, _ = run(1)
    assert keys0 == keys0_again
    assert torch.equal(images0, images0_again)
    assert keys0 != keys1

    # one loader across epochs: its persistent workers follow set_epoch
    loader = build_train_loader(cfg, source, lut, DistEnv(1, 2), seed=3)
    per_epoch = []
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        per_epoch.append([k for b in loader for k in b["key"]])
    assert per_epoch == [keys0, keys1, keys0]


def test_a_process_holding_a_loader_with_persistent_workers_exits(manifest_path):
    """The workers ignore SIGTERM, so multiprocessing's exit hook alone would wait forever."""
    script = textwrap.dedent(
        f"""
        from cil_dist.config import AugmentConfig, DataConfig
        from cil_dist.data.pipeline import ShardSource, build_train_loader
        from cil_dist.distributed import DistEnv
        from cil_dist.protocol import TaskProtocol

        cfg = DataConfig(manifest={manifest_path!r}, resize=[128, 64], batch_size=2,
                         num_workers=2, augment=AugmentConfig(crop=[64, 32]))
        lut = TaskProtocol.load("cityscapes_cil").stage_lut(1)
        loader = build_train_loader(cfg, ShardSource.from_config(cfg, "task1"), lut, DistEnv(), 0)
        batches = iter(loader)
        next(batches)  # module-level loader, its epoch not finished: alive at exit
        print("ready", flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "ready" in done.stdout, done.stderr


def test_shard_urls_brace_pattern_and_pipe(shard_dir):
    cfg = data_config(workers=0, shards=["x"])
    pattern = str(shard_dir / "val" / "val-{000000..000001}.tar")
    assert sum(eval_keys(cfg, ShardSource.from_urls(pattern), 1).values()) == 6
    piped = [f"pipe:cat {shard_dir / 'val' / f'val-00000{i}.tar'}" for i in range(2)]
    assert sum(eval_keys(cfg, ShardSource.from_urls(piped), 2).values()) == 6
    with pytest.raises(ConfigError, match="samples_per_epoch"):
        build_train_loader(
            cfg, ShardSource.from_urls(pattern), np.zeros(256, np.uint8), DistEnv(), 0
        )


@pytest.fixture
def http_root(shard_dir):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shard_dir))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_manifest_and_shards_over_http(http_root, manifest_path):
    url = f"{http_root}/manifest.json"
    cfg = data_config(url, workers=2)
    seen = eval_keys(cfg, ShardSource.from_manifest(url, "val"), 2)
    assert sum(seen.values()) == Manifest.load(manifest_path).splits["val"].samples == 6


@pytest.fixture
def damaged_copy(shard_dir, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(shard_dir, copy)
    return copy


def read_all(manifest: str, split: str) -> None:
    cfg = data_config(manifest, workers=0)
    for _ in build_eval_loader(cfg, ShardSource.from_manifest(manifest, split), DistEnv()):
        pass


def test_truncated_shard_names_url_and_key(damaged_copy):
    shard = damaged_copy / "task1" / "task1-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])
    # both: the shard, and the key of the sample it breaks in (or the last one read whole)
    with pytest.raises(
        ShardReadError, match=r"task1-000001\.tar: .*\((at|after) sample '\w+_\d+_\d+'"
    ):
        read_all(str(damaged_copy / "manifest.json"), "task1")


def test_modified_shard_fails_its_checksum(damaged_copy):
    shard = damaged_copy / "task1" / "task1-000000.tar"
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 0xFF  # inside the last member's payload or padding: the tar still parses
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardChecksumError, match=r"task1-000000\.tar.*sha256"):
        read_all(str(damaged_copy / "manifest.json"), "task1")


def test_missing_shard_is_named(damaged_copy):
    (damaged_copy / "val" / "val-000001.tar").unlink()
    with pytest.raises(ShardReadError, match=r"val-000001\.tar"):
        read_all(str(damaged_copy / "manifest.json"), "val")


def test_too_few_samples_for_the_batch_is_a_config_error(manifest_path, paper_protocol):
    cfg = data_config(manifest_path, workers=0, batch=6)
    with pytest.raises(ConfigError, match="batch_size"):
        build_train_loader(
            cfg,
            ShardSource.from_manifest(manifest_path, "task1"),
            paper_protocol.stage_lut(1),
            DistEnv(0, 2),
            seed=0,
        )
