"""The one place that decides rank, world, device and backend.

``DistEnv.from_environment()`` reads torchrun's variables (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``) or SLURM's (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``) and picks
``nccl`` + ``cuda:LOCAL_RANK`` where CUDA exists, ``gloo`` + CPU otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job: immutable, passed to everything that needs it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str = "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls, env: dict[str, str] | None = None, use_cuda: bool | None = None):
        """Resolve the record from the environment (torchrun first, then SLURM)."""
        env = dict(os.environ if env is None else env)
        if "RANK" in env and "WORLD_SIZE" in env:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            local = int(env.get("LOCAL_RANK", rank))
        elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
            local = int(env.get("SLURM_LOCALID", 0))
        else:
            rank, world, local = 0, 1, 0
        cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
        if cuda:
            return cls(rank, world, local, f"cuda:{local}", "nccl")
        return cls(rank, world, local, "cpu", "gloo")


def cpu_threads_per_rank(env: dict[str, str] | None = None) -> int:
    """Intra-op threads for one rank: the node's cores shared by its local ranks.

    Oversubscribed OpenMP threads spin against each other and can slow a CPU step tenfold, so
    each rank gets OMP_NUM_THREADS threads if set (a chain job sets it to its resources'
    ``cpus_per_task``), else SLURM's ``--cpus-per-task``, else ``cores // local ranks``.
    """
    env = dict(os.environ if env is None else env)
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        if env.get(name, "").isdigit():
            return max(1, int(env[name]))
    local = int(env.get("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", "1")).split("(")[0])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, local))


class CollectiveTimeout(RuntimeError):
    """A collective waited longer than ``dist.timeout_s`` for another rank (hung or dead)."""


def is_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` is gloo's (or the store's) error for a collective that timed out: gloo
    says "Timed out waiting …", "Socket Timeout" or, when the timeout closes the connection in
    the middle of a transfer, "Application timeout caused pair closure"."""
    text = str(exc).lower()
    found = ("timed out", "socket timeout", "application timeout")
    return isinstance(exc, RuntimeError) and any(phrase in text for phrase in found)


def init_distributed(env: DistEnv, timeout_s: float | None = None) -> None:
    """Join the process group (``env://``: MASTER_ADDR/MASTER_PORT from torchrun or SLURM);
    ``timeout_s`` bounds how long the rendezvous and every collective wait (torch's default:
    30 min on gloo, 10 min on NCCL)."""
    import torch.distributed as dist

    if not env.device.startswith("cuda"):
        torch.set_num_threads(cpu_threads_per_rank())
        log.debug("cpu: %d intra-op thread(s) per rank", torch.get_num_threads())

    if env.device.startswith("cuda"):
        torch.cuda.set_device(env.local_rank)
    if env.distributed and not dist.is_initialized():
        timeout = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
        dist.init_process_group(env.backend, rank=env.rank, world_size=env.world_size, **timeout)


@contextlib.contextmanager
def process_group(env: DistEnv, timeout_s: float) -> Iterator[None]:
    """Join the process group for the block (``timeout_s``: ``dist.timeout_s``) and leave it
    afterwards; a collective that times out inside ends as one :class:`CollectiveTimeout`."""
    try:
        init_distributed(env, timeout_s)  # the rendezvous waits for the others as long
        yield
    except RuntimeError as exc:
        if env.distributed and is_timeout(exc):
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "timeout"
            raise CollectiveTimeout(
                f"rank {env.rank}: another rank did not answer within dist.timeout_s = "
                f"{timeout_s:g} s (hung, dead or slower than the timeout allows); "
                f"stopping (last checkpoint intact): {first}"
            ) from exc
        raise
    finally:
        cleanup_distributed()


def cleanup_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    import torch.distributed as dist

    if env.distributed and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few floats over all ranks (used only when logging)."""
    import torch.distributed as dist

    if not (env.distributed and dist.is_initialized()):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor)
    return tensor.tolist()
