"""Shared fixtures: a tiny synthetic Cityscapes tree and its shards, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

# OpenMP threads that spin at barriers slow a CPU step tenfold when another process shares the
# cores (the other rank, a job on the test cluster): let idle threads sleep instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Three workers and the ranks and jobs they start share 2 cores: a second intra-op thread per
# process only adds synchronisation (tests/test_train.py alone: 14 % less CPU with one thread).
# Chain jobs still set their own (resources.cpus_per_task), as on a cluster.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

from cil_dist.protocol import TaskProtocol
from tests.drivers import reap

TINY_SIZE = (128, 64)

# `make test` runs the suite on pytest-xdist workers, one test file per worker at a time, the
# longest files first, so that no worker is left with a long one at the end. The two SLURM files
# start clusters of their own (launch/slurm/*.sh: separate daemons, ports and accounting
# databases; the apt install and munged's start are locked host-wide), so they run side by side.
LONGEST_FIRST = (
    "tests/test_end_to_end.py",
    "tests/test_slurm.py",
    "tests/test_multinode_slurm.py",
    "tests/test_chains.py",
    "tests/test_driver_faults.py",
    "tests/test_rank_failures.py",
    "tests/test_cli.py",
)


def file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False  # the collection's order, set below
    return LoadFileScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):  # an xdist worker: the longest units first
        rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(file_of(item.nodeid), len(rank)))


@pytest.fixture(scope="session")
def paper_protocol() -> TaskProtocol:
    return TaskProtocol.load("cityscapes_cil")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory, paper_protocol) -> Path:
    """2 frames per city of the paper protocol at 128x64 (34 train, 2 held-out, 6 val)."""
    from shards.synth import generate

    root = tmp_path_factory.mktemp("cityscapes")
    generate(root, paper_protocol, images_per_city=2, size=TINY_SIZE, seed=0)
    return root


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, synth_root, paper_protocol) -> Path:
    """Shards of 3 samples (uneven: task1 has 8 samples in shards of 3, 3, 2)."""
    from shards.pack import pack

    out = tmp_path_factory.mktemp("shards")
    pack(synth_root, str(out), paper_protocol, size=TINY_SIZE, samples_per_shard=3)
    return out


@pytest.fixture(scope="session")
def manifest_path(shard_dir) -> str:
    return str(shard_dir / "manifest.json")


@pytest.fixture
def reaper():
    """Processes a test started (pid -> start time); whatever survives the test is killed."""
    started: dict[int, str] = {}
    yield started
    reap(started)
