"""Helpers for tests that train: configs on the tiny shards and real multi-process runs."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import torch.multiprocessing as mp

from cil_dist.config import AugmentConfig, DataConfig, TrainConfig


def error_lines(stderr: str) -> list[str]:
    """The ERROR log lines of a CLI's stderr (a user error ends in exactly one)."""
    return [line for line in stderr.splitlines() if " ERROR " in line]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_train_config(manifest: str, out_dir: Path, name: str = "run", **stage) -> TrainConfig:
    """A fast config on the 128x64 test shards (1 epoch, fp32, no workers)."""
    cfg = TrainConfig(name=name, out_dir=str(out_dir), seed=0, log_every=1, tensorboard=False)
    cfg.data = DataConfig(
        manifest=manifest,
        resize=[128, 64],
        batch_size=2,
        eval_batch_size=4,
        num_workers=0,
        shuffle_buffer=4,
        augment=AugmentConfig(crop=[96, 48]),
    )
    cfg.optim.epochs = 1
    cfg.precision.dtype = "fp32"
    cfg.checkpoint.every_epochs = 1
    cfg.eval.after_training = False
    for key, value in stage.items():
        setattr(cfg.stage, key, value)
    return cfg


# Ranks fork from a server process that imported these once: a fresh interpreter per rank spends
# about 3 s of CPU importing torch (half of a two-rank test's CPU on a slow host).
RANK_PRELOAD = ["torch", "torch.distributed", "cil_dist.training.train"]


def _spawned(rank: int, world: int, port: int, fn: Callable, args: tuple, env: dict) -> None:
    # a forkserver child starts with the server's environment (multiprocessing moves it to the
    # caller's folder): take the caller's, as a spawned process would (monkeypatched
    # credentials, endpoints, PATH)
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    fn(rank, *args)


def run_ranks(fn: Callable, world: int, *args) -> None:
    """Run ``fn(rank, *args)`` in ``world`` real processes with torch.distributed env set.

    Each rank is a separate process (its own memory, gloo over TCP), forked from a forkserver
    that has imported torch; it sees the caller's environment and working folder."""
    mp.set_forkserver_preload(RANK_PRELOAD)
    mp.start_processes(
        _spawned,
        args=(world, free_port(), fn, args, dict(os.environ)),
        nprocs=world,
        join=True,
        start_method="forkserver",
    )
