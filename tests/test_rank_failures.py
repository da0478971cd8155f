"""A rank of a local job fails: the status names the first failed rank; a hung, killed or
preempted rank; the rank watch that stops a job's other ranks once one failed.

Real 2-rank local-executor chains over the tiny test shards, and real processes for the watch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cil_dist.data.pipeline import ShardSource
from cil_dist.data.shardlist import assign, epoch_order
from launch import procs
from launch import state as st
from launch.cli import main as launch_main
from launch.rank_watch import RankWatch
from tests.chains import corrupt_copy, write_chain
from tests.drivers import (
    STAGES,
    chain_processes,
    start_reaped_driver,
    survivors,
    wait_for_epoch,
    wait_for_ranks,
)


@pytest.mark.slow
def test_status_names_the_rank_that_failed_first_and_its_log(
    tmp_path, shard_dir, manifest_path, capsys
):
    # the task-1 shards rank 1 (of 2, no loader workers) reads first in epoch 0: only rank 1
    # meets the corrupt one, rank 0 only loses its peer
    refs = list(ShardSource.from_manifest(manifest_path, "task1").refs)
    mine = assign(epoch_order(refs, 0, 0), 2, 1)[0].ref.url
    others = [piece.ref.url for piece in assign(epoch_order(refs, 0, 0), 2, 0)]
    assert mine not in others
    relative = str(Path(mine).relative_to(shard_dir))
    broken = corrupt_copy(shard_dir, manifest_path, tmp_path / "shards", relative)
    path = write_chain(tmp_path, broken, {"s1": STAGES["s1"]})
    run = tmp_path / "run"

    assert launch_main(["submit", str(path), "--out", str(run)]) == 1
    record = st.ChainState.load(run).jobs["s1"]
    assert record.state == "FAILED"
    assert record.error.startswith("rank 1: ShardChecksumError: ")
    assert Path(relative).name in record.error
    assert record.log.endswith("_1_log.out") and Path(record.log).is_file()
    assert "ShardChecksumError" in Path(record.log).read_text()
    rank0 = Path(record.log.replace("_1_log.out", "_0_log.out")).read_text()
    assert "ShardChecksumError" not in rank0  # rank 0 only lost its peer
    capsys.readouterr()
    assert launch_main(["status", str(run)]) == 1
    out = capsys.readouterr().out
    assert "error: rank 1: ShardChecksumError" in out
    assert f"log: {record.log}" in out


def test_status_names_a_hung_rank_by_the_collective_timeout_line(tmp_path, manifest_path, reaper):
    """Rank 1 stopped mid-run (SIGSTOP): rank 0 gives up after ``dist.timeout_s`` and the
    job's status shows that one line as the cause, not rank 1's lost peer once it resumes."""
    overrides = ["dist.timeout_s=5", "checkpoint.every_epochs=50"]
    path = write_chain(tmp_path, manifest_path, {"s1": STAGES["s1"]}, 100, overrides=overrides)
    run = tmp_path / "run"
    driver = start_reaped_driver(path, run, reaper)
    wait_for_ranks(run, "s1", driver)
    ranks = wait_for_epoch(run, "s1", driver, "epoch 2/100")
    reaper.update(chain_processes(driver))
    os.kill(ranks[1]["pid"], signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 60
        while not any(r.get("error") for r in st.rank_records(run, "s1") if r["rank"] == 0):
            assert time.monotonic() < deadline, "rank 0 never gave up"
            time.sleep(0.2)
    finally:
        os.kill(ranks[1]["pid"], signal.SIGCONT)  # the job's controller waits for every rank
    assert driver.wait(timeout=120) == 1
    record = st.ChainState.load(run).jobs["s1"]
    assert record.state == st.FAILED
    assert record.error.startswith(
        "rank 0: CollectiveTimeout: rank 0: another rank did not answer within dist.timeout_s = 5 s"
    ), record.error
    assert "\n" not in record.error


@pytest.mark.slow
def test_a_preempted_two_rank_job_requeues_and_resumes_without_the_watch_stopping_it(
    tmp_path, manifest_path, reaper
):
    """USR2 to both ranks, as submitit's local controller sends it before the time limit: rank 0
    checkpoints and requeues, rank 1 then loses its peer — part of the requeue, not a failure —
    and the controller's second attempt resumes on two ranks, untouched by the rank watch."""
    path = write_chain(tmp_path, manifest_path, {"s1": STAGES["s1"]}, 8)
    run = tmp_path / "run"
    driver = start_reaped_driver(path, run, reaper)
    wait_for_ranks(run, "s1", driver)
    ranks = wait_for_epoch(run, "s1", driver, "epoch 2/8")
    log = Path(ranks[0]["log"])
    reaper.update(chain_processes(driver))
    for rank in ranks.values():
        os.kill(rank["pid"], signal.SIGUSR2)
    assert driver.wait(timeout=240) == 0
    assert st.ChainState.load(run).jobs["s1"].state == st.COMPLETED
    status = st.read_status(run, "s1")
    assert (status["attempts"], status["preempted"], status["requeue_pending"]) == (2, True, False)
    assert "resumed from" in log.read_text()
    assert "rank_watch" not in (run.parent / "driver.log").read_text()


def test_a_rank_killed_before_the_rendezvous_ends_its_job_at_once(tmp_path, manifest_path, reaper):
    """Rank 1 killed (SIGKILL, as the out-of-memory killer does) while it starts: rank 0 would wait
    for it at the rendezvous until ``dist.timeout_s`` (600 s); the driver records rank 1 as lost
    and stops rank 0 and the job's controller within seconds."""
    path = write_chain(
        tmp_path, manifest_path, {"s1": STAGES["s1"]}, overrides=["dist.timeout_s=600"]
    )
    run = tmp_path / "run"
    driver = start_reaped_driver(path, run, reaper)
    deadline = time.monotonic() + 120
    while True:  # both ranks recorded themselves; they now import torch, then meet
        ranks = {r["rank"]: r for r in st.rank_records(run, "s1") if r.get("pid")}
        if len(ranks) == 2:
            break
        assert time.monotonic() < deadline and driver.poll() is None, "the ranks never started"
        time.sleep(0.02)
    reaper.update(chain_processes(driver))
    os.kill(ranks[1]["pid"], signal.SIGKILL)
    assert driver.wait(timeout=120) == 1  # not after dist.timeout_s
    record = st.ChainState.load(run).jobs["s1"]
    assert record.state == st.FAILED
    assert record.error.startswith(
        f"rank 1: RankLost: process {ranks[1]['pid']} ended without a result or an error"
    ), record.error
    log = (run.parent / "driver.log").read_text()
    assert "s1: rank 1 failed" in log and "s1: stopping " in log and "s1 rank 0" in log
    assert not survivors(reaper)  # the controller, rank 0 and its children are gone


def test_rank_watch_stops_the_other_ranks_after_one_failed_and_kills_one_ignoring_sigint(
    tmp_path,
):
    """The watch itself, over real processes: once rank 1 recorded an error, the grace period
    later rank 0 (which ignores SIGINT) and a task of the job's controller that has not recorded
    itself get SIGINT; the task ends, and with it the controller; rank 0 is killed after the
    next period."""
    ignore_sigint = (
        "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print(flush=True); "
        "time.sleep(300)"
    )
    controller_code = (
        "import subprocess; task = subprocess.Popen(['sleep', '300']); "
        "print(task.pid, flush=True); raise SystemExit(task.wait() != -2)"
    )
    controller = subprocess.Popen([sys.executable, "-c", controller_code], stdout=subprocess.PIPE)
    rank0 = subprocess.Popen([sys.executable, "-c", ignore_sigint], stdout=subprocess.PIPE)
    rank1 = subprocess.Popen(["sleep", "300"])  # the rank that fails
    try:
        task = int(controller.stdout.readline())
        rank0.stdout.readline()  # SIGINT is ignored from now on
        table = procs.snapshot()
        job = st.JobRecord("s1", "train", [], "", "", st.RUNNING, str(controller.pid))
        job.started = table[controller.pid].started
        chain = st.ChainState("tiny", "local", str(tmp_path), "", "", {"s1": job})
        for rank, process in enumerate((rank0, rank1)):
            started = table[process.pid].started
            st.rank_started(
                tmp_path, "s1", rank, 2, job_id=job.job_id, pid=process.pid, started=started
            )
        watch = RankWatch(chain, grace_s=0.5, kill_after_s=0.5)
        watch.check(["s1"])
        assert "s1" not in watch.stopping  # no rank failed yet
        st.rank_failed(tmp_path, "s1", 1, ValueError("a corrupt shard"))
        rank1.kill()
        rank1.wait()
        watch.check(["s1"])
        assert "s1" in watch.stopping
        watch.check(["s1"])
        assert procs.alive(task, table[task].started)  # within the grace period
        time.sleep(0.6)
        watch.check(["s1"])  # SIGINT: the task ends, and the controller with it
        assert controller.wait(timeout=10) == 0  # its task ended by SIGINT
        time.sleep(1.0)
        assert rank0.poll() is None  # it ignores SIGINT
        watch.check(["s1"])  # SIGKILL
        assert rank0.wait(timeout=10) == -signal.SIGKILL
    finally:
        for process in (controller, rank0, rank1):
            process.kill()
            process.wait()
