"""Helpers for tests of the local chain driver: start it as a user would, find its processes,
and wait for a stage's ranks and epochs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from launch import procs
from launch import state as st

STAGES = {
    "s1": {"method": "cil", "stage": 1},
    "s2": {"method": "cil", "stage": 2, "teacher": "s1"},
}


def start_driver(path: Path, run: Path, ignore_sigint: bool = False) -> subprocess.Popen:
    """``cil-launch submit --executor local`` in its own process (as ``cmd &`` in a script)."""
    command = [sys.executable, "-m", "launch.cli", "submit", str(path), "--out", str(run)]
    if ignore_sigint:  # background jobs of a non-interactive shell: SIGINT ignored
        command = ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *command]
    log = (run.parent / "driver.log").open("w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def start_reaped_driver(path: Path, run: Path, reaper: dict[int, str]) -> subprocess.Popen:
    """:func:`start_driver` into a new ``run`` folder; the driver is killed after the test if
    it still runs (``reaper``: the fixture of that name)."""
    run.mkdir()
    driver = start_driver(path, run)
    reaper[driver.pid] = procs.snapshot()[driver.pid].started
    return driver


def wait_for_ranks(run: Path, name: str, driver: subprocess.Popen, ranks: int = 2) -> int:
    """The pid of ``name``'s controller once its ranks run (and rank 0 reported RUNNING)."""
    deadline = time.monotonic() + 120
    while True:
        if st.read_status(run, name).get("state") == st.RUNNING:
            controller = int(st.ChainState.load(run).jobs[name].job_id or 0)
            if len(procs.descendants({controller}, procs.snapshot())) >= ranks:
                return controller
        assert time.monotonic() < deadline and driver.poll() is None, f"{name} never started"
        time.sleep(0.2)


def chain_processes(driver: subprocess.Popen) -> dict[int, str]:
    """pid -> start time of the driver and every process below it (controllers, ranks)."""
    table = procs.snapshot()
    pids = {driver.pid} | procs.descendants({driver.pid}, table)
    return {pid: table[pid].started for pid in pids if pid in table}


def survivors(found: dict[int, str]) -> list[int]:
    table = procs.snapshot()
    return [pid for pid, started in found.items() if procs.alive(pid, started, table)]


def wait_for_epoch(run: Path, name: str, driver: subprocess.Popen, line: str) -> dict[int, dict]:
    """The rank records of ``name`` once both ranks recorded themselves and rank 0's log shows
    ``line`` (e.g. ``"epoch 2/8"``)."""
    deadline = time.monotonic() + 120
    while True:
        ranks = {r["rank"]: r for r in st.rank_records(run, name)}
        log = Path(ranks.get(0, {}).get("log") or run / "none")
        if len(ranks) == 2 and log.is_file() and line in log.read_text():
            return ranks
        assert time.monotonic() < deadline and driver.poll() is None, f"no {line!r}"
        time.sleep(0.2)


def reap(found: dict[int, str]) -> None:
    """SIGKILL to every process of ``found`` (pid -> start time) that still runs."""
    for pid in survivors(found):
        os.kill(pid, signal.SIGKILL)
