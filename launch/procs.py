"""The processes of a local chain: who they are, their descendants, and stopping them for sure.

A process is identified by its pid *and* its start time (as ``ps`` prints it), so a pid that
the system has reused since it was recorded is never mistaken for the chain's. Zombies count
as gone: they run nothing and only wait for their parent to reap them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

PS = ["ps", "-A", "-o", "pid=,ppid=,stat=,lstart="]


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    stat: str
    started: str


def snapshot() -> dict[int, Proc]:
    """Every live (non-zombie) process of this machine, by pid."""
    done = subprocess.run(
        PS, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}, check=False
    )
    table = {}
    for line in done.stdout.splitlines():
        parts = line.split(maxsplit=3)
        if len(parts) == 4 and not parts[2].startswith(("Z", "X")):
            pid, ppid = int(parts[0]), int(parts[1])
            table[pid] = Proc(pid, ppid, parts[2], " ".join(parts[3].split()))
    return table


def start_time(pid: int) -> str:
    """When process ``pid`` started ('' when it does not run)."""
    proc = snapshot().get(pid)
    return proc.started if proc else ""


def alive(pid: int, started: str, table: dict[int, Proc] | None = None) -> bool:
    """Whether the process recorded as (``pid``, ``started``) still runs ('' skips the check)."""
    proc = (snapshot() if table is None else table).get(pid)
    return proc is not None and (not started or proc.started == started)


def descendants(pids: set[int], table: dict[int, Proc]) -> set[int]:
    """Every live process below ``pids`` in the process tree."""
    children: dict[int, list[int]] = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    found: set[int] = set()
    frontier = list(pids)
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in found:
                found.add(child)
                frontier.append(child)
    return found


class Targets:
    """Processes to stop, each with its start time and a label; follows their children."""

    def __init__(self) -> None:
        self.known: dict[int, tuple[str, str]] = {}  # pid -> (start time, label)

    def add(self, pid: int, started: str, label: str, table: dict[int, Proc]) -> None:
        if pid > 1 and pid != os.getpid() and alive(pid, started, table):  # never init
            self.known.setdefault(pid, (table[pid].started, label))

    def live(self, table: dict[int, Proc]) -> list[int]:
        """The targets still running; their new children become targets too."""
        running = {pid for pid, (started, _) in self.known.items() if alive(pid, started, table)}
        for child in descendants(running, table) - set(self.known):
            parent = self.known.get(table[child].ppid, ("", "a process of the chain"))[1]
            self.known[child] = (table[child].started, f"{parent} (child {child})")
            running.add(child)
        return sorted(running)

    def label(self, pid: int) -> str:
        return self.known[pid][1]


def send(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def wait_gone(targets: Targets, timeout_s: float, poll_s: float = 0.2) -> list[int]:
    """Wait up to ``timeout_s`` for every target to end; returns those still running."""
    deadline = time.monotonic() + timeout_s
    while True:
        running = targets.live(snapshot())
        if not running or time.monotonic() >= deadline:
            return running
        time.sleep(poll_s)


def stop(targets: Targets, first: list[int], grace_s: float, kill_wait_s: float = 5.0):
    """SIGINT to ``first``, then SIGTERM and finally SIGKILL to every target still running,
    ``grace_s`` apart; returns the pids that survived even SIGKILL (normally none)."""
    send(first, signal.SIGINT)
    running = wait_gone(targets, grace_s)
    for signum, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, kill_wait_s)):
        if not running:
            break
        log.warning(
            "%d process(es) still running after %.0f s: sending %s",
            len(running),
            grace_s,
            signal.Signals(signum).name,
        )
        send(running, signum)
        running = wait_gone(targets, wait_s)
    return running
