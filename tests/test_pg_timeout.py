"""A hung rank ends a 2-rank gloo job within ``dist.timeout_s`` (real CLI processes), with one
line and exit code 3 (``EXIT_TIMEOUT``: operational, not a user error's 2)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cil_dist.cli import EXIT_TIMEOUT
from cil_dist.config import ConfigError
from cil_dist.distributed import DistEnv
from cil_dist.training.train import build
from tests.helpers import error_lines, free_port, tiny_train_config

BIN = Path(sys.executable).parent
TIMEOUT_S = 5
MARGIN_S = 15  # the exception's way out, teardown and a loaded 2-core machine


def start_rank(rank: int, config: Path, port: int, log: Path) -> subprocess.Popen:
    env = dict(
        os.environ,
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    with log.open("w") as stream:
        return subprocess.Popen(
            [BIN / "cil", "train", "--config", config], env=env, stderr=stream, cwd=log.parent
        )


def assert_one_error_line(stderr: str, expected: str) -> None:
    """The job's end is one ERROR line, its last, holding ``expected``; no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = error_lines(stderr)
    assert len(errors) == 1 and expected in errors[0], stderr
    assert stderr.strip().splitlines()[-1] == errors[0], stderr


def wait_for(log: Path, text: str, proc: subprocess.Popen, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"no {text!r} in {log.read_text()}"
        time.sleep(0.1)


def test_a_stopped_rank_ends_the_job_within_the_timeout(manifest_path, tmp_path):
    cfg = tiny_train_config(manifest_path, tmp_path / "runs", name="hang", method="joint")
    cfg.optim.epochs = 100
    cfg.dist.timeout_s = TIMEOUT_S
    # the healthy part waits at every collective this short timeout must survive: checkpoint
    # writes by rank 0 behind a barrier and validation every epoch
    cfg.eval.every_epochs, cfg.eval.splits = 1, ["heldout"]
    config = tmp_path / "hang.yaml"
    config.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    port = free_port()
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    ranks = [start_rank(r, config, port, logs[r]) for r in range(2)]
    try:
        wait_for(logs[0], "epoch 2: heldout mIoU", ranks[0])  # 2 epochs, 1 checkpoint
        os.kill(ranks[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        code = ranks[0].wait(timeout=TIMEOUT_S + MARGIN_S)
        waited = time.monotonic() - stopped
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    text = logs[0].read_text()
    assert code == EXIT_TIMEOUT, text
    assert_one_error_line(text, "rank 0: another rank did not answer within dist.timeout_s = 5 s")
    assert TIMEOUT_S - 1 <= waited <= TIMEOUT_S + MARGIN_S
    assert (tmp_path / "runs" / "hang" / "checkpoints" / "epoch_0001.pt").is_file()


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_a_timeout_that_is_not_positive_is_refused(manifest_path, tmp_path, value):
    cfg = tiny_train_config(manifest_path, tmp_path, method="joint")
    cfg.dist.timeout_s = value
    with pytest.raises(ConfigError, match=r"dist\.timeout_s: must be > 0"):
        build(cfg, DistEnv())


@pytest.mark.parametrize(
    "message",
    [
        "[gloo/transport/tcp/pair.cc:534] Timed out waiting 5000ms for recv operation to complete",
        "Socket Timeout",
        "Application timeout caused pair closure",  # the timeout hit mid-transfer
    ],
)
def test_every_form_of_gloo_timeout_is_recognised(message):
    from cil_dist.distributed import is_timeout

    assert is_timeout(RuntimeError(message))
    assert not is_timeout(RuntimeError("Connection closed by peer"))
    assert not is_timeout(ValueError(message))


def test_cil_eval_gives_up_on_a_missing_rank_after_dist_timeout(manifest_path, tmp_path):
    from cil_dist.training.train import run_training

    final = run_training(tiny_train_config(manifest_path, tmp_path, name="s1", stage=1))
    env = dict(
        os.environ,
        RANK="0",
        WORLD_SIZE="2",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        OMP_NUM_THREADS="1",
    )  # rank 1 never comes
    command = [BIN / "cil", "eval", "--checkpoint", final, "--set", f"dist.timeout_s={TIMEOUT_S}"]
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    waited = time.monotonic() - started
    assert done.returncode == EXIT_TIMEOUT, done.stderr
    assert_one_error_line(done.stderr, f"dist.timeout_s = {TIMEOUT_S} s")
    assert waited <= TIMEOUT_S + MARGIN_S + 15  # + the CLI's start-up
