"""A local chain's driver under faults: it ignores SIGINT, it dies hard, with or without its jobs.

Real 2-rank local-executor chains over the tiny test shards; processes are checked by pid (and
start time, so a reused pid is not mistaken for a survivor).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from launch import state as st
from launch.cli import main as launch_main
from tests.chains import write_chain
from tests.drivers import STAGES, chain_processes, start_driver, survivors, wait_for_ranks


@pytest.mark.slow
def test_cancel_stops_a_driver_that_ignores_sigint_and_every_job_process(
    tmp_path, manifest_path, reaper
):
    path = write_chain(tmp_path, manifest_path, STAGES, epochs=500)
    run = tmp_path / "run"
    driver = start_driver(path, run, ignore_sigint=True)
    wait_for_ranks(run, "s1", driver)
    found = chain_processes(driver)
    reaper.update(found)
    assert len(found) >= 4  # driver, controller, 2 ranks

    started = time.monotonic()
    assert launch_main(["cancel", str(run), "--grace", "2"]) == 0
    assert driver.poll() is not None, "the driver survived the cancel"
    assert survivors(found) == [], "a process of the chain survived the cancel"
    assert time.monotonic() - started < 20
    time.sleep(2 * 1.0)  # a driver that still ran would record its states within a poll
    states = {n: r.state for n, r in st.ChainState.load(run).jobs.items()}
    assert states == {"s1": "CANCELLED", "s2": "CANCELLED"}


@pytest.mark.slow
def test_resubmit_after_the_driver_was_killed_adopts_the_running_job(
    tmp_path, manifest_path, reaper, capsys
):
    path = write_chain(tmp_path, manifest_path, STAGES, epochs=2)
    run = tmp_path / "run"
    driver = start_driver(path, run)
    wait_for_ranks(run, "s1", driver)
    reaper.update(chain_processes(driver))
    assert launch_main(["submit", str(path), "--out", str(run)]) == 2  # one driver at a time
    driver.send_signal(signal.SIGKILL)  # the job's controller and ranks keep running
    driver.wait()

    assert launch_main(["submit", str(path), "--out", str(run)]) == 0
    chain = st.ChainState.load(run)
    assert {n: r.state for n, r in chain.jobs.items()} == {"s1": "COMPLETED", "s2": "COMPLETED"}
    assert st.read_status(run, "s1")["attempts"] == 1  # waited for, not started again
    assert chain.jobs["s1"].submissions == [chain.jobs["s1"].job_id]
    assert "| " in capsys.readouterr().out  # the chain is final: the report is printed


@pytest.mark.slow
def test_resubmit_waits_for_orphaned_ranks_instead_of_running_the_job_twice(
    tmp_path, manifest_path, reaper
):
    path = write_chain(tmp_path, manifest_path, {"s1": STAGES["s1"]}, epochs=2)
    run = tmp_path / "run"
    driver = start_driver(path, run)
    controller = wait_for_ranks(run, "s1", driver)
    reaper.update(chain_processes(driver))
    for pid in (driver.pid, controller):  # out of memory took both; the ranks run on
        os.kill(pid, signal.SIGKILL)
    driver.wait()

    assert launch_main(["submit", str(path), "--out", str(run)]) == 0
    assert st.ChainState.load(run).jobs["s1"].state == "COMPLETED"
    assert st.read_status(run, "s1")["attempts"] == 1  # never two copies of the stage at once


@pytest.mark.slow
def test_resubmit_after_the_driver_and_its_job_died_reruns_the_job(tmp_path, manifest_path, reaper):
    path = write_chain(tmp_path, manifest_path, {"s1": STAGES["s1"]}, epochs=3)
    run = tmp_path / "run"
    driver = start_driver(path, run)
    wait_for_ranks(run, "s1", driver)
    checkpoints = run / "stages" / "s1" / "checkpoints"
    while not list(checkpoints.glob("*.pt")):  # an epoch is done and saved
        assert driver.poll() is None
        time.sleep(0.05)
    found = chain_processes(driver)
    reaper.update(found)
    for pid in found:
        os.kill(pid, signal.SIGKILL)
    driver.wait()
    while survivors(found):
        time.sleep(0.1)

    assert launch_main(["submit", str(path), "--out", str(run)]) == 0
    record = st.ChainState.load(run).jobs["s1"]
    assert record.state == "COMPLETED"
    assert st.read_status(run, "s1")["attempts"] == 2
    assert "resumed from" in Path(record.log).read_text()  # not from scratch


def test_a_restarted_attempt_drops_the_failed_attempts_traceback_and_end(tmp_path):
    """A requeued job's status shows the running attempt, not the lost one's error."""
    st.job_started(tmp_path, "s1", "7")
    st.job_failed(tmp_path, "s1", RuntimeError("peer lost"))
    assert st.read_status(tmp_path, "s1")["traceback"]
    assert st.job_started(tmp_path, "s1", "7") == 2
    status = st.read_status(tmp_path, "s1")
    assert (status["state"], status["error"], status["traceback"], status["finished"]) == (
        st.RUNNING,
        "",
        "",
        "",
    )
