"""Object storage with real servers on 127.0.0.1: moto's S3 server (in memory), Python's HTTP
server, and a TCP proxy that resets connections mid-shard."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import replace

import boto3
import pytest
import torch

from cil_dist import storage, urls
from cil_dist.data.manifest import Manifest
from cil_dist.data.pipeline import ShardSource, build_eval_loader, build_train_loader
from cil_dist.data.reading import ShardChecksumError, ShardReadError
from cil_dist.distributed import DistEnv
from shards import cli as shards_cli
from tests.servers import Fault, ResetProxy, gcs_emulator, moto_server, static_http
from tests.test_pack import SMALL, VAL_IMAGE, make_small_tree
from tests.test_pipeline import data_config, eval_keys

KEY_ID = "cil-test-key-id"
SECRET = "cil-dist-TEST-secret-3b9f27e1c5"  # must never show up in logs, configs, checkpoints
BUCKET = "cil-shards"
PREFIX = f"s3://{BUCKET}/tiny"
MANIFEST = f"{PREFIX}/manifest.json"
FAST = {"read_retries": 1, "retry_backoff": 0.01}


@pytest.fixture(scope="session")
def aws_env():
    """Credentials of the test server in the standard AWS variables, nothing from ~/.aws."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
        patch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            patch.delenv(name, raising=False)
        yield


@pytest.fixture(scope="session")
def s3_endpoint(aws_env):
    with moto_server() as url:
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
        yield url


@pytest.fixture
def proxy(s3_endpoint):
    proxy = ResetProxy(s3_endpoint)
    yield proxy
    proxy.close()


@pytest.fixture(scope="session")
def packed(s3_endpoint, synth_root):
    """The tiny dataset packed by the CLI to s3:// through a recording proxy."""
    recorder = ResetProxy(s3_endpoint)
    try:
        code = shards_cli.main(
            [
                "pack",
                "--cityscapes",
                str(synth_root),
                "--out",
                PREFIX,
                "--endpoint-url",
                recorder.url,
                "--size",
                "128x64",
                "--samples-per-shard",
                "3",
                "--workers",
                "2",
            ]
        )
    finally:
        recorder.close()
    assert code == 0
    return recorder.requests


def at(endpoint: str) -> storage.StorageOptions:
    """The storage options that reach the S3 server at ``endpoint``."""
    return storage.StorageOptions(endpoint_url=endpoint)


def s3_config(endpoint: str, workers: int = 2, **kw) -> object:
    return data_config(MANIFEST, workers=workers, endpoint_url=endpoint, **kw)


# ---------------------------------------------------------------------------------- helpers
def test_redact_url_strips_secrets_but_keeps_the_object():
    signed = "https://h:9000/b/task1-000001.tar?X-Amz-Credential=K%2F1&X-Amz-Signature=abc"
    assert urls.redact_url(signed) == "https://h:9000/b/task1-000001.tar"
    assert urls.redact_url("s3://key:secret@bucket/a.tar") == "s3://bucket/a.tar"
    text = f"shard {signed}: reset (after 'k'); see http://u:p@x/y#frag"
    assert urls.redact_url(text) == "shard https://h:9000/b/task1-000001.tar: reset " + (
        "(after 'k'); see http://x/y"
    )
    assert urls.redact_url("/data/shards/a.tar") == "/data/shards/a.tar"


# ------------------------------------------------------------------------- pack and verify
def test_pack_uploads_shards_then_the_manifest_last(packed, s3_endpoint, manifest_path):
    puts = [line.split()[1] for line in packed if line.startswith("PUT ")]
    assert puts[-1].endswith("/tiny/manifest.json")
    assert sum(p.endswith(".tar") for p in puts) == 15
    remote, local = Manifest.load(MANIFEST, at(s3_endpoint)), Manifest.load(manifest_path)
    assert [s.sha256 for r in remote.splits.values() for s in r.shards] == [
        s.sha256 for r in local.splits.values() for s in r.shards
    ]


def test_verify_reports_a_corrupted_object(packed, s3_endpoint, capsys):
    assert shards_cli.main(["verify", MANIFEST, "--endpoint-url", s3_endpoint]) == 0
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    key = "tiny/val/val-000001.tar"
    good = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    try:
        client.put_object(Bucket=BUCKET, Key=key, Body=good[:5000] + b"X" * 100 + good[5100:])
        capsys.readouterr()
        assert shards_cli.main(["verify", MANIFEST, "--endpoint-url", s3_endpoint]) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if "ERROR" in line]
        assert len(errors) == 2, errors  # the bad shard, then the count
        assert f"{PREFIX}/val/val-000001.tar: sha256" in errors[0]
        assert "1 bad shard(s)" in errors[1]
    finally:
        client.put_object(Bucket=BUCKET, Key=key, Body=good)


def test_check_readable(packed, s3_endpoint):
    assert storage.check_readable(MANIFEST, at(s3_endpoint)) is None
    assert "not found" in storage.check_readable(f"{PREFIX}/nope.json", at(s3_endpoint))
    assert "not reachable" in storage.check_readable("http://127.0.0.1:1/manifest.json")


def test_endpoint_from_the_standard_aws_variable(packed, s3_endpoint, monkeypatch):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    assert Manifest.load(MANIFEST).splits["val"].samples == 6
    s3fs.S3FileSystem.clear_instance_cache()


def test_two_s3_endpoints_serve_one_process_side_by_side(packed, s3_endpoint, shard_dir):
    """Two S3 servers hold different shards under the very same URLs; two sources and their
    loaders (2 workers each, read interleaved) each reach the server of their own options —
    what one process-wide endpoint could not do."""
    local = Manifest.load(str(shard_dir / "manifest.json"))
    val, task2 = local.splits["val"], local.splits["task2"]
    count = min(len(val.shards), len(task2.shards))
    with moto_server() as other_endpoint:
        client = boto3.client("s3", endpoint_url=other_endpoint)
        client.create_bucket(Bucket=BUCKET)
        # the other server's "val" holds task2's shards, under val's object names
        shards = []
        for own, theirs in zip(val.shards[:count], task2.shards[:count], strict=True):
            client.upload_file(str(shard_dir / theirs.file), BUCKET, f"tiny/{own.file}")
            shards.append(replace(theirs, file=own.file, recipe=""))
        other = replace(local, splits={"val": replace(task2, split="val", shards=shards)})
        other.save(MANIFEST, at(other_endpoint))

        assert len(Manifest.load(MANIFEST, at(s3_endpoint)).splits) == len(local.splits)
        assert list(Manifest.load(MANIFEST, at(other_endpoint)).splits) == ["val"]
        configs = [s3_config(s3_endpoint), s3_config(other_endpoint)]
        sources = [ShardSource.from_config(cfg, "val") for cfg in configs]
        refs = [source.refs[:count] for source in sources]
        assert [ref.url for ref in refs[0]] == [ref.url for ref in refs[1]]  # the same URLs
        assert [ref.sha256 for ref in refs[0]] != [ref.sha256 for ref in refs[1]]  # other bytes
        loaders = [
            build_eval_loader(cfg, source, DistEnv())
            for cfg, source in zip(configs, sources, strict=True)
        ]
        seen = [Counter(), Counter()]
        for batches in itertools.zip_longest(*loaders):  # both servers' streams open at once
            for counter, batch in zip(seen, batches, strict=True):
                counter.update(batch["key"] if batch else [])
        for loader in loaders:
            loader.close()
    assert set(seen[0].values()) == set(seen[1].values()) == {1}
    assert sum(seen[0].values()) == val.samples
    assert {key.split("_")[0] for key in seen[0]} <= set(val.cities)
    assert sum(seen[1].values()) == sum(shard.samples for shard in shards)
    assert {key.split("_")[0] for key in seen[1]} <= set(task2.cities)


def test_a_failed_repack_on_s3_keeps_the_old_dataset_then_one_switches(s3_endpoint, tmp_path):
    """As on a local folder: shards that change go to new keys, so a re-pack failing after it
    uploaded them leaves the old manifest verifying; the next one switches with one PUT of the
    manifest and deletes the old shard objects, and only those."""
    from shards.pack import PackError, pack
    from shards.verify import verify_manifest

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    prefix, root = f"s3://{BUCKET}/repack", make_small_tree(tmp_path / "cityscapes")

    def objects() -> set[str]:
        listing = client.list_objects_v2(Bucket=BUCKET, Prefix="repack/").get("Contents", [])
        return {item["Key"].removeprefix("repack/") for item in listing}

    def repack(options: storage.StorageOptions):
        return pack(
            root, prefix, SMALL, size=(32, 16), samples_per_shard=2, workers=1, options=options
        )

    first = repack(at(s3_endpoint))
    client.put_object(Bucket=BUCKET, Key="repack/task2/task2-notes.tar", Body=b"not a shard")
    old = {s.file for r in first.manifest.splits.values() for s in r.shards}
    make_small_tree(root, seed=100)
    image = root / VAL_IMAGE
    good = image.read_bytes()
    image.write_bytes(b"\x89PNG not really")
    with pytest.raises(PackError, match=r"lindau_000000_000000_leftImg8bit\.png.*cannot read"):
        repack(at(s3_endpoint))
    assert verify_manifest(f"{prefix}/manifest.json", options=at(s3_endpoint)) == []
    uploaded = objects() - old - {"manifest.json", "task2/task2-notes.tar"}
    assert len([key for key in uploaded if not key.startswith("val/")]) == 5, uploaded
    assert not [key for key in uploaded if key.startswith("val/val-000000")]  # not half a shard

    image.write_bytes(good)
    recorder = ResetProxy(s3_endpoint)
    try:
        second = repack(at(recorder.url))
    finally:
        recorder.close()
    assert verify_manifest(f"{prefix}/manifest.json", options=at(s3_endpoint)) == []
    new = {s.file for r in second.manifest.splits.values() for s in r.shards}
    assert objects() == new | {"manifest.json", "task2/task2-notes.tar"} and not new & old
    writes = [line.split()[:2] for line in recorder.requests if line[0] in "PD"]  # PUT, DELETE
    switch = writes.index(["PUT", "/cil-shards/repack/manifest.json"])  # the one manifest PUT
    assert {verb for verb, key in writes[:switch]} == {"PUT"}
    assert [verb for verb, key in writes if key.endswith("manifest.json")] == ["PUT"]
    assert [key for verb, key in writes if verb == "DELETE"] == [
        f"/cil-shards/repack/{file}" for file in sorted(old)
    ]


# ------------------------------------------------------------------------------ streaming
@pytest.mark.parametrize("split", ["task1", "val"])
def test_eval_over_s3_sees_every_sample_once_on_2_ranks_x_2_workers(packed, s3_endpoint, split):
    cfg = s3_config(s3_endpoint, workers=2)
    seen = eval_keys(cfg, ShardSource.from_config(cfg, split), world=2)
    assert set(seen.values()) == {1}
    assert sum(seen.values()) == Manifest.load(MANIFEST, at(s3_endpoint)).splits[split].samples


def test_presigned_https_style_urls_stream_and_are_shown_without_signature(packed, s3_endpoint):
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    urls = [
        client.generate_presigned_url(
            "get_object", Params={"Bucket": BUCKET, "Key": f"tiny/val/val-00000{i}.tar"}
        )
        for i in range(2)
    ]
    assert all("Signature=" in url for url in urls)
    cfg = data_config(workers=2, shards=urls)
    seen = eval_keys(cfg, ShardSource.from_urls(urls), world=2)
    assert sum(seen.values()) == 6 and set(seen.values()) == {1}

    missing = client.generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": "tiny/val/val-000009.tar"}
    )
    cfg = data_config(workers=0, shards=[missing])
    with pytest.raises(ShardReadError) as err:
        list(build_eval_loader(cfg, ShardSource.from_urls(missing), DistEnv()))
    assert "val-000009.tar" in str(err.value) and "?" not in str(err.value)
    assert "Signature" not in str(err.value) and KEY_ID not in str(err.value)
    assert "Signature" not in storage.check_readable(missing)


# ---------------------------------------------------------------------------------- faults
TARGET = "task1-000001.tar"  # 3 of task1's 8 samples


class Store:
    """A shard store behind a resetting proxy: its manifest URL and data configs."""

    def __init__(self, kind: str, proxy: ResetProxy, manifest: str):
        self.kind, self.proxy, self.manifest = kind, proxy, manifest

    def config(self, workers: int = 2, **kw):
        extra = {"endpoint_url": self.proxy.url} if self.kind == "s3" else {}
        return data_config(self.manifest, workers=workers, **extra, **kw)

    def source(self, cfg, split: str = "task1") -> ShardSource:
        return ShardSource.from_config(cfg, split)


@pytest.fixture(params=["s3", "http"])
def store(request, shard_dir):
    if request.param == "s3":
        request.getfixturevalue("packed")
        proxy = ResetProxy(request.getfixturevalue("s3_endpoint"))
        yield Store("s3", proxy, MANIFEST)
        proxy.close()
    else:
        with static_http(shard_dir) as url:
            proxy = ResetProxy(url)
            yield Store("http", proxy, f"{proxy.url}/manifest.json")
            proxy.close()


@pytest.fixture(scope="module")
def target(manifest_path):
    """The local record and sample keys of the shard the proxy breaks."""
    from cil_dist.data.reading import iter_shard

    ref = next(r for r in Manifest.load(manifest_path).shard_refs("task1") if TARGET in r.url)
    return ref, [sample["__key__"] for sample in iter_shard(ref)]


def train_epoch(cfg, source, lut, rank: int = 0, world: int = 1):
    loader = build_train_loader(cfg, source, lut, DistEnv(rank, world), seed=5)
    loader.set_epoch(1)
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    images = torch.cat([b["image"] for b in batches]) if batches else torch.empty(0)
    return keys, images, (loader.skipped.shards, loader.skipped.samples), len(batches)


def test_an_epoch_fetches_each_needed_shard_once_without_metadata_requests(store, paper_protocol):
    """8 samples, batches of 2 on one rank: the epoch needs every task-1 shard once, and a
    known size (from the manifest) spares the store a HEAD request per shard."""
    cfg = store.config(workers=0)
    source = store.source(cfg)
    store.proxy.requests.clear()
    keys, _, _, batches = train_epoch(cfg, source, paper_protocol.stage_lut(1))
    assert batches == 4 and sorted(keys) == sorted(set(keys))
    shard_requests = [line for line in store.proxy.requests if "/task1/" in line]
    assert len(shard_requests) == 3, shard_requests
    assert all(line.startswith("GET ") for line in shard_requests), shard_requests


def test_a_reset_mid_shard_is_resumed_and_the_epoch_is_identical(store, target, paper_protocol):
    ref, _ = target
    cfg = store.config(workers=2, **FAST)
    lut = paper_protocol.stage_lut(1)
    clean = train_epoch(cfg, store.source(cfg), lut)
    store.proxy.fault = Fault(TARGET, after_bytes=ref.bytes // 2, times=1)
    faulty = train_epoch(cfg, store.source(cfg), lut)
    assert store.proxy.fault.resets == 1
    assert faulty[0] == clean[0] and torch.equal(faulty[1], clean[1])
    assert faulty[2] == (0, 0)

    store.proxy.fault = Fault(TARGET, after_bytes=ref.bytes // 2, times=1)
    seen = eval_keys(cfg, store.source(cfg), world=2)
    assert store.proxy.fault.resets == 1
    assert sum(seen.values()) == 8 and set(seen.values()) == {1}


def test_exhausted_retries_fail_naming_the_url_and_the_last_key(store, target):
    ref, keys = target
    # the first samples arrive, then the store goes down for good (s3: small ranged reads)
    cfg = store.config(workers=0, block_size=4096, **FAST)
    if store.kind == "s3":
        fault = Fault(TARGET, 0, times=None, from_offset=ref.bytes * 3 // 4)
    else:
        fault = Fault(TARGET, ref.bytes * 3 // 4, times=None, then_refuse=True)
    store.proxy.fault = fault
    with pytest.raises(ShardReadError) as err:
        for _ in build_eval_loader(cfg, store.source(cfg), DistEnv()):
            pass
    if store.kind == "s3":
        # each open fails on (at most) two ranged reads, each tried S3_REQUEST_TRIES² times by
        # s3fs (call and read retried): 36 refused requests, not s3fs's own 5 x 5 (100)
        opens = 1 + FAST["read_retries"]
        assert opens <= fault.resets <= opens * 2 * storage.S3_REQUEST_TRIES**2, fault.resets
    message = str(err.value)
    assert f"/task1/{TARGET}" in message and "after 1 retries" in message
    named = any(f"after sample {key!r}" in message for key in keys)
    # aiohttp discards what it buffered once the connection breaks, so over plain HTTP the
    # drop may come before the first sample; the ranged S3 reads deliver the first samples
    assert named or (store.kind == "http" and "before its first sample" in message), message
    assert not isinstance(err.value, ShardChecksumError)


def test_exhausted_retries_skip_counts_exactly_what_was_lost(store, target):
    _, keys = target
    cfg = store.config(workers=2, on_shard_error="skip", **FAST)
    store.proxy.fault = Fault(TARGET, 0, times=None)
    seen, shards, samples = Counter(), 0, 0
    for rank in range(2):
        loader = build_eval_loader(cfg, store.source(cfg), DistEnv(rank, 2))
        for batch in loader:
            seen.update(batch["key"])
        shards, samples = shards + loader.skipped.shards, samples + loader.skipped.samples
    assert set(seen.values()) == {1} and not set(keys) & set(seen)
    assert (shards, samples) == (1, 3) and sum(seen.values()) == 8 - 3


def test_skip_keeps_equal_batches_per_rank_in_training(store, paper_protocol):
    cfg = store.config(workers=2, on_shard_error="skip", **FAST)
    store.proxy.fault = Fault(TARGET, 0, times=None)
    lut = paper_protocol.stage_lut(1)
    runs = [train_epoch(cfg, store.source(cfg), lut, rank, 2) for rank in range(2)]
    assert [run[3] for run in runs] == [8 // (2 * 2)] * 2
    shards = sum(run[2][0] for run in runs)
    assert shards >= 1 and sum(run[2][1] for run in runs) == 3 * shards


def test_skipped_samples_land_in_the_epoch_metrics(shard_dir, tmp_path):
    from cil_dist.training.train import build, train_one_epoch
    from tests.helpers import tiny_train_config

    with static_http(shard_dir) as url:
        proxy = ResetProxy(url)
        try:
            proxy.fault = Fault(TARGET, 0, times=None)
            cfg = tiny_train_config(f"{proxy.url}/manifest.json", tmp_path, stage=1)
            cfg.data.on_shard_error, cfg.data.read_retries, cfg.data.retry_backoff = "skip", 0, 0
            parts = build(cfg, DistEnv())
            stats = train_one_epoch(parts, cfg, DistEnv())
        finally:
            proxy.close()
    assert parts.state.step == 8 // 2
    assert (stats["skipped_shards"], stats["skipped_samples"]) == (1, 3)  # re-read: counted once


# ------------------------------------------------------------------- training and secrets
def _train_rank(rank: int, manifest: str, out, endpoint: str) -> None:
    """One rank of a tiny 2-rank stage; its stderr (all logging) goes to a file."""
    import os

    from cil_dist.training.train import run_training
    from tests.helpers import tiny_train_config

    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / f"rank{rank}.log", "w")  # noqa: SIM115 - lives as long as the rank
    os.dup2(log_file.fileno(), 2)
    cfg = tiny_train_config(manifest, out, name="run", method="joint")
    cfg.data.endpoint_url = endpoint
    cfg.data.num_workers = 1
    cfg.tensorboard = True
    run_training(cfg)


@pytest.mark.slow
def test_two_rank_stage_from_s3_equals_local_and_leaks_no_secret(
    packed, s3_endpoint, manifest_path, tmp_path
):
    from tests.helpers import run_ranks

    runs = {"s3": tmp_path / "s3", "local": tmp_path / "local"}
    run_ranks(_train_rank, 2, MANIFEST, runs["s3"], s3_endpoint)
    run_ranks(_train_rank, 2, manifest_path, runs["local"], "")
    final = {
        k: torch.load(v / "run/checkpoints/final.pt", weights_only=True) for k, v in runs.items()
    }
    assert final["s3"]["state"] == final["local"]["state"]
    for name, value in final["local"]["model"].items():
        assert torch.equal(value, final["s3"]["model"][name]), name
    assert final["s3"]["config"]["data"]["manifest"] == MANIFEST

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    manifest = client.get_object(Bucket=BUCKET, Key="tiny/manifest.json")["Body"].read()
    written = [p for p in runs["s3"].rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in written)
    assert any("tfevents" in p.name for p in written)
    logs = b"".join(p.read_bytes() for p in written if p.suffix == ".log")
    assert b"epoch 1/1" in logs
    for blob in [manifest, *(p.read_bytes() for p in written)]:
        assert SECRET.encode() not in blob
        assert KEY_ID.encode() not in blob


def test_chain_validation_reaches_the_s3_manifest_before_submitting(
    packed, s3_endpoint, tmp_path, manifest_path
):
    from launch.chain import chain_to_yaml, load_chain
    from launch.validate import ChainError, validate_chain
    from tests.chains import write_chain

    stages = {
        "s1": {"method": "cil", "stage": 1},
        "s2": {"method": "cil", "stage": 2, "teacher": "s1"},
    }
    path = write_chain(tmp_path, manifest_path, stages)
    endpoint = f"overrides=[data.endpoint_url={s3_endpoint}]"
    chain = load_chain(str(path), [f"manifest={MANIFEST}", endpoint])
    jobs = validate_chain(chain, tmp_path / "run", "local")
    assert jobs["s2"].train.data.manifest == MANIFEST

    missing = load_chain(str(path), [f"manifest=s3://{BUCKET}/nothing/manifest.json", endpoint])
    with pytest.raises(
        ChainError, match=r"data\.manifest: s3://cil-shards/nothing/manifest\.json: not found"
    ):
        validate_chain(missing, tmp_path / "run", "local")

    signed = boto3.client("s3", endpoint_url=s3_endpoint).generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": "tiny/manifest.json"}
    )
    assert "Signature" in signed
    text = chain_to_yaml(load_chain(str(path), [f"manifest={signed}"]))
    assert "Signature" not in text and SECRET not in text


def test_gs_pack_verify_and_stream_through_a_gcs_emulator(synth_root, manifest_path, monkeypatch):
    """gs:// end to end against gcp-storage-emulator (gcsfs finds it by STORAGE_EMULATOR_HOST)."""
    with gcs_emulator("cil-gcs") as url:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        prefix = "gs://cil-gcs/tiny"
        args = ["pack", "--cityscapes", str(synth_root), "--out", prefix, "--size", "128x64"]
        assert shards_cli.main([*args, "--samples-per-shard", "3", "--workers", "2"]) == 0
        assert shards_cli.main(["verify", f"{prefix}/manifest.json"]) == 0
        remote, local = Manifest.load(f"{prefix}/manifest.json"), Manifest.load(manifest_path)
        assert [s.sha256 for r in remote.splits.values() for s in r.shards] == [
            s.sha256 for r in local.splits.values() for s in r.shards
        ]
        source = ShardSource.from_manifest(f"{prefix}/manifest.json", "task2")
        keys = eval_keys(data_config(f"{prefix}/manifest.json", workers=2), source, world=2)
        assert set(keys.values()) == {1} and sum(keys.values()) == remote.splits["task2"].samples


def test_a_teacher_on_s3_loads_and_teaches(s3_endpoint, tmp_path, manifest_path):
    from cil_dist.training import checkpoint as ckpt
    from cil_dist.training.teacher import load_teacher
    from cil_dist.training.train import run_training
    from tests.helpers import tiny_train_config

    stage1 = run_training(tiny_train_config(manifest_path, tmp_path, name="s1", stage=1))
    url = f"s3://{BUCKET}/runs/s1/final.pt"
    boto3.client("s3", endpoint_url=s3_endpoint).upload_file(
        str(stage1), BUCKET, "runs/s1/final.pt"
    )
    info = ckpt.describe(url, at(s3_endpoint))
    assert (info.method, info.stage, info.num_classes, info.complete) == ("cil", 1, 5, True)
    teacher = load_teacher(url, 5, "cpu", options=at(s3_endpoint), stage=2)
    local = torch.load(stage1, weights_only=True)["model"]
    assert all(torch.equal(v, local[k]) for k, v in teacher.state_dict().items())
    with pytest.raises(ckpt.CheckpointError, match=f"s3://{BUCKET}/runs/nothing.pt: checkpoint"):
        ckpt.load_checkpoint(f"s3://{BUCKET}/runs/nothing.pt", options=at(s3_endpoint))

    cfg = tiny_train_config(manifest_path, tmp_path, name="s2", stage=2)
    cfg.teacher.checkpoint, cfg.data.endpoint_url = url, s3_endpoint
    final = run_training(cfg)
    assert ckpt.load_checkpoint(final)["config"]["teacher"]["checkpoint"] == url
