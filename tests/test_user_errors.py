"""User-facing errors: one line naming the file, shard, key or option, exit code 2, and never
a secret — with real processes and a real HTTP server on 127.0.0.1 that wants credentials."""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import json
import logging
import re
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

import pytest
from omegaconf import OmegaConf

from cil_dist.data.pipeline import ShardSource
from cil_dist.distributed import DistEnv
from tests.chains import write_chain
from tests.helpers import error_lines, tiny_train_config

BIN = Path(sys.executable).parent
USER, PASSWORD, SIGNATURE = "cil-user", "PASS-4e1d9a", "SECRET-sig-77b2c0"
BROKEN = "task1-000001.tar"  # 3 samples (task1: 3 + 3 + 2)


class CredentialHandler(http.server.SimpleHTTPRequestHandler):
    """Serves ``directory`` to Basic auth ``USER:PASSWORD`` only; the manifest (and any request
    with a query) wants ``?sig=SIGNATURE``, as a pre-signed URL. ``faults`` maps a file name to
    "500", "404" or "truncate" (half its bytes, then a clean end)."""

    faults: ClassVar[dict[str, str]] = {}

    def log_message(self, *args) -> None:
        """No request log on the test's stderr."""

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        signed = parse_qs(parts.query).get("sig") == [SIGNATURE]
        needs_sig = parts.query or parts.path.endswith("manifest.json")
        if self.headers.get("Authorization") != f"Basic {token}" or (needs_sig and not signed):
            self.send_error(403)
            return
        fault = self.faults.get(parts.path.rsplit("/", 1)[-1])
        if fault in ("500", "404"):
            self.send_error(int(fault))
            return
        self.path = parts.path
        if fault != "truncate":
            super().do_GET()
            return
        data = Path(self.directory, parts.path.lstrip("/")).read_bytes()
        data = data[: len(data) // 2 + 100]
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextlib.contextmanager
def credential_http(root: Path, faults: dict[str, str]) -> Iterator[str]:
    """The server on 127.0.0.1; yields its plain base URL (``http://127.0.0.1:PORT``)."""
    handler_class = type("Handler", (CredentialHandler,), {"faults": faults})
    handler = functools.partial(handler_class, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def with_credentials(base: str) -> str:
    return base.replace("http://", f"http://{USER}:{PASSWORD}@")


def assert_no_secret(folder: Path, *texts: str) -> None:
    """Neither the password nor the signature in ``texts`` or in any file under ``folder`` —
    but the job pickles submitit runs (``*_submitted.pkl``: the job's own config, URLs as
    given, as the README says); its logs and result pickles are checked."""
    for text in texts:
        assert PASSWORD not in text and SIGNATURE not in text, text
    for path in folder.rglob("*"):
        if path.is_file() and not path.name.endswith("_submitted.pkl"):
            data = path.read_bytes()
            assert PASSWORD.encode() not in data and SIGNATURE.encode() not in data, path


def tiny_yaml(folder: Path, out_dir: Path, **data) -> Path:
    """A 1-epoch training config on the tiny shards with one DataLoader worker."""
    cfg = tiny_train_config("", out_dir, name="leak")
    cfg.data.num_workers = 1
    cfg.data.read_retries, cfg.data.retry_backoff = 1, 0.01
    container = OmegaConf.structured(cfg)
    container.data = OmegaConf.merge(container.data, data)
    path = folder / "train.yaml"
    path.write_text(OmegaConf.to_yaml(container))
    return path


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("500", "gave up at byte 0 after 1 retries"),
        ("404", "cannot open: not found (before its first sample)"),
        ("truncate", "unreadable or truncated tar"),
    ],
)
def test_a_data_error_in_training_is_one_line_without_secrets(fault, expected, shard_dir, tmp_path):
    """Shard URLs with user info and a signature; the error escapes a DataLoader worker."""
    with credential_http(shard_dir, {BROKEN: fault}) as base:
        pattern = f"{with_credentials(base)}/task1/task1-{{000000..000002}}.tar?sig={SIGNATURE}"
        out = tmp_path / "runs"
        config = tiny_yaml(tmp_path, out, shards=[pattern], samples_per_epoch=8)
        done = subprocess.run(
            [BIN / "cil", "train", "--config", config],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = error_lines(done.stderr)
    assert len(errors) == 1, done.stderr
    assert re.match(
        rf"\d\d:\d\d:\d\d \[rank0\] ERROR cil: shard {base}/task1/{BROKEN}: ", errors[0]
    )
    assert expected in errors[0], errors
    if fault == "truncate":  # the key of the sample cut off
        with tarfile.open(shard_dir / "task1" / BROKEN) as tar:
            keys = {name.split(".", 1)[0] for name in tar.getnames()}
        found = re.search(r"\(at sample '([^']+)'", errors[0])
        assert found and found.group(1) in keys, (errors, keys)
    assert_no_secret(out, done.stdout, done.stderr)


def test_a_corrupt_shard_fails_the_chain_job_with_one_line_and_no_secret(shard_dir, tmp_path):
    """A pre-signed manifest URL with credentials; the job's status, the status listing and
    every file of the run folder (job logs included) stay free of them."""
    from launch import state as st
    from launch.cli import main as launch_main

    with credential_http(shard_dir, {BROKEN: "truncate"}) as base:
        manifest = f"{with_credentials(base)}/manifest.json?sig={SIGNATURE}"
        path = write_chain(tmp_path / "chain", manifest, {"s1": {"method": "cil", "stage": 1}})
        run = tmp_path / "run"
        sets = [
            "resources.tasks_per_node=1",
            "overrides=[data.num_workers=1,data.read_retries=1,data.retry_backoff=0.01]",
        ]
        code = launch_main(["submit", str(path), "--out", str(run), "--set", *sets])
    assert code == 1
    record = st.ChainState.load(run).jobs["s1"]
    assert record.state == st.FAILED
    assert "\n" not in record.error, record.error
    assert f"shard {base}/task1/{BROKEN}: " in record.error, record.error
    assert re.search(r"\(at sample '\w+', ", record.error), record.error
    assert_no_secret(run)


def test_a_bad_set_override_names_the_override_not_the_yaml_file(tmp_path):
    cases = [
        (["cil", "train", "--config", "demo_synthetic", "--set", "optim.lr=abc"],
         "--set optim.lr=abc: optim.lr: Value 'abc' of type 'str' could not be converted"),
        (["cil", "train", "--config", "demo_synthetic", "--set", "optim.lrr=1"],
         "--set optim.lrr=1: optim.lrr: Key 'lrr' not in 'OptimConfig'"),
        (["cil-launch", "submit", "demo_synthetic", "--out", "o", "--set", "resourcez=1"],
         "--set resourcez=1: resourcez: Key 'resourcez' not in 'ChainConfig'"),
    ]  # fmt: skip
    for (cli, *args), expected in cases:
        done = subprocess.run(
            [BIN / cli, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], lines
        assert "demo_synthetic.yaml" not in done.stderr


def test_chain_validation_lists_each_problem_once(tmp_path, manifest_path, monkeypatch):
    from launch.chain import load_chain
    from launch.validate import ChainError, validate_chain

    stages = {
        "s1": {"method": "cil", "stage": 1},
        "s2": {"method": "cil", "stage": 2, "teacher": "s1"},
    }
    path = write_chain(tmp_path, manifest_path, stages, evaluations={"e": {"stage": "s1"}})
    monkeypatch.setenv("PATH", str(tmp_path / "no-sbatch-here"))
    sets = ["eval_resources={cpus_per_task: 3}", "stages.s2.resources={mem_gb: 3}"]
    chain = load_chain(str(path), [*sets, "overrides=[optim.lrr=1]"])
    with pytest.raises(ChainError) as caught:
        validate_chain(chain, tmp_path / "run", "slurm", str(path))
    problems = caught.value.problems
    assert problems.count("executor slurm: `sbatch` is not on PATH (run on a cluster login node)")
    assert len(problems) == len(set(problems)), problems
    bad = [p for p in problems if "optim.lrr" in p]
    assert [p.split(": ")[0] for p in bad] == ["stages.s1", "stages.s2"], problems
    assert all(p.startswith(f"{s}: override optim.lrr=1: optim.lrr: Key 'lrr'") for p, s in zip(
        bad, ("stages.s1", "stages.s2"), strict=True)), problems  # fmt: skip


@pytest.fixture
def one_shard_missing(shard_dir, tmp_path) -> str:
    copy = tmp_path / "shards"
    shutil.copytree(shard_dir, copy)
    (copy / "task1" / BROKEN).unlink()
    return str(copy / "manifest.json")


def test_a_missing_shard_counts_once_with_its_samples(one_shard_missing, tmp_path, caplog):
    """Read again in later cycles by the worker that fills its quota, and by both workers:
    still one shard and its 3 samples."""
    from cil_dist.training.train import build, log_epoch, train_one_epoch

    cfg = tiny_train_config(one_shard_missing, tmp_path, stage=1)
    cfg.data.on_shard_error, cfg.data.num_workers = "skip", 2
    parts = build(cfg, DistEnv())
    stats = train_one_epoch(parts, cfg, DistEnv())
    assert parts.state.step == 8 // 2
    assert (stats["skipped_shards"], stats["skipped_samples"]) == (1, 3)
    with caplog.at_level(logging.WARNING):
        log_epoch(stats, cfg, 1)
    assert "epoch 1: 3 samples of 1 unreadable shard(s) skipped" in caplog.text


def _skipping_rank(rank: int, manifest: str, out: Path) -> None:
    """One rank of a 2-rank, 2-worker epoch with on_shard_error=skip; writes its stats."""
    from cil_dist.distributed import cleanup_distributed, init_distributed
    from cil_dist.training.train import build, train_one_epoch

    env = DistEnv.from_environment()
    init_distributed(env)
    try:
        cfg = tiny_train_config(manifest, out, stage=1)
        cfg.data.on_shard_error, cfg.data.num_workers, cfg.data.batch_size = "skip", 2, 1
        parts = build(cfg, env)
        stats = train_one_epoch(parts, cfg, env)
        (out / f"rank{rank}.json").write_text(json.dumps(stats))
    finally:
        cleanup_distributed()


def test_a_shard_read_by_both_ranks_counts_once(shard_dir, tmp_path):
    """2 ranks × 2 workers are 4 slots for 3 shards: the first shard of epoch 0 is shared by
    a worker of each rank. Remove that one: both ranks meet it (and read it again in later
    cycles), the epoch's figures still say one shard and its samples."""
    from cil_dist.data.shardlist import epoch_order
    from tests.helpers import run_ranks

    copy = tmp_path / "shards"
    shutil.copytree(shard_dir, copy)
    manifest = str(copy / "manifest.json")
    refs = ShardSource.from_manifest(manifest, "task1").refs
    shared = epoch_order(list(refs), 0, 0)[0]  # seed 0 (tiny_train_config), epoch 0, cycle 0
    Path(shared.url).unlink()
    run_ranks(_skipping_rank, 2, manifest, tmp_path)
    for rank in range(2):
        stats = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert (stats["skipped_shards"], stats["skipped_samples"]) == (1, shared.samples)


def test_chain_validation_names_a_credentialed_manifest_without_its_secrets(shard_dir, tmp_path):
    from launch.chain import load_chain
    from launch.validate import ChainError, validate_chain

    with credential_http(shard_dir, {}) as base:
        manifest = f"{with_credentials(base)}/manifest.json?sig={SIGNATURE}"
        evaluations = {"e": {"stage": "s1", "split": "nosuch"}}
        stages = {"s1": {"method": "cil", "stage": 1}}
        path = write_chain(tmp_path, manifest, stages, evaluations=evaluations)
        with pytest.raises(ChainError) as caught:
            validate_chain(load_chain(str(path)), tmp_path / "run", "local", str(path))
    assert f"e: split 'nosuch' is not in {base}/manifest.json (it has" in str(caught.value)
    assert_no_secret(tmp_path / "run", str(caught.value), *caught.value.problems)


def test_a_slot_whose_every_shard_is_unreadable_ends_in_one_line(shard_dir, tmp_path):
    """``on_shard_error: skip`` and no readable task1 shard (not found, server error, cut
    off) behind a credentialed, pre-signed manifest URL: the DataLoader worker's slot finds no
    samples, and ``cil train`` says so in one line naming the redacted source and the slot,
    exit code 2."""
    faults = {"task1-000000.tar": "404", "task1-000001.tar": "500", "task1-000002.tar": "truncate"}
    with credential_http(shard_dir, faults) as base:
        manifest = f"{with_credentials(base)}/manifest.json?sig={SIGNATURE}"
        out = tmp_path / "runs"
        config = tiny_yaml(tmp_path, out, manifest=manifest, on_shard_error="skip")
        done = subprocess.run(
            [BIN / "cil", "train", "--config", config],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = error_lines(done.stderr)
    assert len(errors) == 1, done.stderr
    assert errors[0].endswith(
        f"ERROR cil: {base}/manifest.json [task1]: slot 0 of 1 finds no samples in 64 passes "
        "over its shards (every shard it reads is unreadable; data.on_shard_error=skip)"
    ), errors
    for name in faults:  # each shard was tried and skipped
        assert f"skipping the rest of {base}/task1/{name}" in done.stderr, name
    assert_no_secret(out, done.stdout, done.stderr)
