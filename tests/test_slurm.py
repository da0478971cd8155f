"""Chains on a real single-node SLURM cluster on 127.0.0.1 (slurmctld, slurmd, slurmdbd).

The session fixture starts the cluster with ``launch/slurm/local_cluster.sh`` (installing
the Debian packages if they are missing) and stops it afterwards — unless it was already
running, in which case it is left alone.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import submitit

from launch import state as st
from launch.chain import load_chain
from launch.cli import main as launch_main
from launch.executors import submitit_folder
from launch.monitor import refresh, wait_for_chain
from launch.slurm_states import sacct_states
from launch.submit import submit_chain
from launch.validate import ChainError
from tests.chains import cluster, cluster_running, corrupt_copy, final_weights, write_chain
from tests.test_chains import THREE_STAGES

pytestmark = pytest.mark.slow

CONF = os.environ.get("CIL_SLURM_DIR", "/tmp/cil-slurm") + "/etc/slurm.conf"
CHAIN_TIMEOUT_S = 480


@pytest.fixture(scope="module")
def slurm():
    """A running cluster; SLURM_CONF points the clients (sbatch, sacct, submitit) at it."""
    was_running = cluster_running(CONF)
    if not was_running:
        started = cluster("start")
        assert started.returncode == 0, f"local SLURM cluster did not start:\n{started.stderr}"
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = CONF
    yield CONF
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    if not was_running:
        cluster("stop")


def all_job_ids() -> set[str]:
    done = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID", "-a"], capture_output=True)
    return set(done.stdout.decode().split())


def job_times(job_id: str) -> tuple[str, str]:
    done = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "Start,End", "-j", job_id], capture_output=True, text=True
    )
    start, end = done.stdout.strip().splitlines()[0].split("|")
    return start, end


def wait_for_sacct(job_ids: str | list[str], state: str) -> None:
    """Until the accounting database records every job in ``state`` (within the chain timeout).

    slurmdbd lags behind slurmctld: a job squeue (and so the chain) shows ended may still be
    RUNNING in sacct for a moment."""
    job_ids = [job_ids] if isinstance(job_ids, str) else list(job_ids)
    deadline = time.monotonic() + CHAIN_TIMEOUT_S
    while sacct_states(job_ids) != dict.fromkeys(job_ids, state):
        assert time.monotonic() < deadline, (state, sacct_states(job_ids))
        time.sleep(0.5)


def test_three_stage_chain_runs_in_dependency_order_with_teachers(slurm, tmp_path, manifest_path):
    path = write_chain(
        tmp_path,
        manifest_path,
        THREE_STAGES,
        evaluations={"e3": {"stage": "s3", "task_sets": ["1", "123"]}},
        report={"CIL": "e3"},
    )
    run = tmp_path / "run"
    chain_state = submit_chain(load_chain(str(path)), run, "slurm")
    ids = {name: record.job_id for name, record in chain_state.jobs.items()}
    assert len(set(ids.values())) == 4
    final = wait_for_chain(run, poll_s=2, timeout_s=CHAIN_TIMEOUT_S)
    assert {n: r.state for n, r in final.jobs.items()} == dict.fromkeys(ids, "COMPLETED")
    wait_for_sacct(list(ids.values()), "COMPLETED")
    times = {name: job_times(job_id) for name, job_id in ids.items()}
    assert times["s1"][1] <= times["s2"][0] and times["s2"][1] <= times["s3"][0]
    assert times["s3"][1] <= times["e3"][0]
    for stage, teacher in (("s2", "s1"), ("s3", "s2")):
        config = (run / "stages" / stage / "config.yaml").read_text()
        assert str(run / "stages" / teacher / "checkpoints" / "final.pt") in config
        status = st.read_status(run, stage)
        assert status["world_size"] == 2 and status["attempts"] == 1
    assert Path(final.jobs["s3"].log).is_file()
    assert set(json.loads((run / "evals" / "e3" / "metrics.json").read_text())) == {"1", "123"}


def test_preempted_job_requeues_resumes_mid_epoch_and_matches_uninterrupted(
    slurm, tmp_path, manifest_path
):
    """Checkpoints every 3 steps (none at epoch ends): the requeued job resumes inside the epoch
    the preemption interrupted, and its final weights equal an uninterrupted run's."""
    stages = {"s1": {"method": "cil", "stage": 1}}
    every = ["checkpoint.every_steps=3", "checkpoint.every_epochs=100", "checkpoint.keep=50"]
    chains = {}
    for name in ("interrupted", "uninterrupted"):
        path = write_chain(tmp_path / name, manifest_path, stages, epochs=6, overrides=every)
        chains[name] = submit_chain(load_chain(str(path)), tmp_path / name / "run", "slurm")
    run = tmp_path / "interrupted" / "run"
    checkpoints = run / "stages" / "s1" / "checkpoints"
    deadline = time.monotonic() + CHAIN_TIMEOUT_S
    while not list(checkpoints.glob("epoch_*_step_*.pt")):
        assert time.monotonic() < deadline, "no mid-epoch checkpoint written"
        time.sleep(0.2)
    job_id = chains["interrupted"].jobs["s1"].job_id
    submitit.SlurmJob(submitit_folder(run), job_id)._interrupt()  # SIGTERM, then USR2
    for name in chains:
        final = wait_for_chain(tmp_path / name / "run", poll_s=2, timeout_s=CHAIN_TIMEOUT_S)
        assert final.jobs["s1"].state == st.COMPLETED, final.jobs["s1"]
    status = st.read_status(run, "s1")
    assert status["attempts"] == 2 and status.get("preempted")
    log = Path(chains["interrupted"].jobs["s1"].log).read_text()
    resumed_from = log.split("resumed from ")[1].split()[0]
    assert re.search(r"epoch_\d{4}_step_\d{6}\.pt$", resumed_from), resumed_from  # mid-epoch
    epoch, step = (int(v) for v in re.findall(r"\d+", Path(resumed_from).name))
    assert step > 0 and epoch < 6
    interrupted = final_weights(run, "s1")
    uninterrupted = final_weights(tmp_path / "uninterrupted" / "run", "s1")
    assert interrupted.keys() == uninterrupted.keys()
    for key in interrupted:
        assert (interrupted[key] == uninterrupted[key]).all(), key


def test_failing_stage_cancels_dependents_and_status_reports_it(
    slurm, tmp_path, shard_dir: Path, manifest_path, monkeypatch
):
    broken = corrupt_copy(shard_dir, manifest_path, tmp_path / "shards", "task2/")
    path = write_chain(tmp_path, broken, THREE_STAGES, evaluations={"e3": {"stage": "s3"}})
    run = tmp_path / "run"
    s2 = submit_chain(load_chain(str(path)), run, "slurm").jobs["s2"].job_id
    wait_for_sacct(s2, "FAILED")
    # s2 reported its failure, but SLURM does not answer: the chain's verdict waits for SLURM's
    # word (a job that failed may be requeued), so nothing is failed or cancelled yet
    with monkeypatch.context() as patch:
        patch.setenv(
            "SLURM_CONF", unreachable_conf(slurm, tmp_path, controller=True, database=True)
        )
        undecided = refresh(st.ChainState.load(run)).jobs
    assert st.read_status(run, "s2")["state"] == st.FAILED
    assert {n: undecided[n].state for n in ("s2", "s3", "e3")} == {
        n: st.PENDING for n in ("s2", "s3", "e3")
    }
    final = wait_for_chain(run, poll_s=2, timeout_s=CHAIN_TIMEOUT_S)
    states = {n: r.state for n, r in final.jobs.items()}
    assert states == {"s1": "COMPLETED", "s2": "FAILED", "s3": "CANCELLED", "e3": "CANCELLED"}
    assert "task2" in final.jobs["s2"].error and "sha256" in final.jobs["s2"].error.lower()
    assert Path(final.jobs["s2"].log).is_file()
    assert launch_main(["status", str(run)]) == 1
    ids = [final.jobs[n].job_id for n in ("s3", "e3")]
    wait_for_sacct(ids, "CANCELLED")


def test_a_rank_killed_before_the_rendezvous_ends_the_job_at_once_and_is_named(
    slurm, tmp_path, manifest_path
):
    """Rank 1 killed while it starts: without ``srun --kill-on-bad-exit=1`` (this cluster does not
    set KillOnBadExit) rank 0 would wait for it at the rendezvous until ``dist.timeout_s``. Rank
    1 records nothing; srun's report in the job's log names it as the failure."""
    stages = {"s1": {"method": "cil", "stage": 1}}
    path = write_chain(tmp_path, manifest_path, stages, overrides=["dist.timeout_s=600"])
    run = tmp_path / "run"
    submit_chain(load_chain(str(path)), run, "slurm")
    deadline = time.monotonic() + CHAIN_TIMEOUT_S
    while True:  # both ranks recorded themselves; they now import torch, then meet
        ranks = {r["rank"]: r for r in st.rank_records(run, "s1") if r.get("pid")}
        if len(ranks) == 2:
            break
        assert time.monotonic() < deadline, "the ranks never started"
        time.sleep(0.02)
    os.kill(ranks[1]["pid"], signal.SIGKILL)
    final = wait_for_chain(run, poll_s=1, timeout_s=120)  # not after dist.timeout_s
    assert final.jobs["s1"].state == st.FAILED, final.jobs["s1"]
    assert final.jobs["s1"].error.startswith(
        f"rank 1: RankLost: task 1 on {ranks[1]['host']} (srun: Killed) ended without a result"
    ), final.jobs["s1"].error
    assert final.jobs["s1"].log == ranks[1]["log"]


def test_invalid_chain_is_refused_before_any_job_is_queued(slurm, tmp_path, manifest_path):
    stages = {
        "s1": {"method": "cil", "stage": 1, "resources": {"nodes": 3}},  # the cluster has 1 node
        "s2": {"method": "cil", "stage": 2, "teacher": "ghost"},
    }
    path = write_chain(tmp_path, manifest_path, stages)
    before = all_job_ids()
    with pytest.raises(ChainError) as caught:
        submit_chain(load_chain(str(path)), tmp_path / "run", "slurm")
    assert "stages.s1.resources: SLURM refuses the job" in str(caught.value)
    assert "stages.s2.teacher: 'ghost' is not a stage" in str(caught.value)
    assert all_job_ids() == before
    assert not (tmp_path / "run" / "chain.json").exists()


def test_cancel_stops_every_queued_and_running_job(slurm, tmp_path, manifest_path):
    stages = {key: THREE_STAGES[key] for key in ("s1", "s2")}
    path = write_chain(tmp_path, manifest_path, stages, epochs=500)
    run = tmp_path / "run"
    submitted = submit_chain(load_chain(str(path)), run, "slurm")
    ids = [submitted.jobs[name].job_id for name in ("s1", "s2")]
    wait_for_sacct(ids[0], "RUNNING")
    assert launch_main(["cancel", str(run)]) == 0
    wait_for_sacct(ids, "CANCELLED")
    assert {r.state for r in st.ChainState.load(run).jobs.values()} == {"CANCELLED"}


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def unreachable_conf(conf: str, folder: Path, *, controller: bool, database: bool) -> str:
    """A copy of the cluster's slurm.conf whose slurmctld and/or slurmdbd port is a closed one:
    squeue (the controller) and/or sacct (the accounting database) cannot reach their daemon."""
    lines = []
    for line in Path(conf).read_text().splitlines():
        key = line.partition("=")[0]
        if (key == "SlurmctldPort" and controller) or (key == "AccountingStoragePort" and database):
            line = f"{key}={closed_port()}"
        lines.append(line)
    path = folder / f"slurm-{int(controller)}{int(database)}.conf"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_refresh_keeps_the_chain_when_slurm_does_not_answer(
    slurm, tmp_path, manifest_path, monkeypatch, caplog
):
    # a controller or database that does not answer (restart, overload) decides nothing: the
    # jobs keep their states and dependents stay queued; with the controller alone down, the
    # accounting database's word is used
    stages = {key: THREE_STAGES[key] for key in ("s1", "s2")}
    path = write_chain(tmp_path, manifest_path, stages, epochs=500)
    run = tmp_path / "run"
    ids = [r.job_id for r in submit_chain(load_chain(str(path)), run, "slurm").jobs.values()]
    wait_for_sacct(ids[0], "RUNNING")
    expected = {"s1": st.RUNNING, "s2": st.PENDING}
    try:
        assert {n: r.state for n, r in refresh(st.ChainState.load(run)).jobs.items()} == expected
        for controller, database in ((True, True), (True, False)):
            caplog.clear()
            with (
                monkeypatch.context() as patch,
                caplog.at_level(logging.WARNING, "launch.slurm_states"),
            ):
                patch.setenv(
                    "SLURM_CONF",
                    unreachable_conf(slurm, tmp_path, controller=controller, database=database),
                )
                jobs = refresh(st.ChainState.load(run)).jobs
            assert {name: r.state for name, r in jobs.items()} == expected, (controller, database)
            assert not any(r.error for r in jobs.values())
            warned = caplog.text
            assert "squeue" in warned and ("sacct" in warned) == database, warned
        assert sacct_states(ids) == {ids[0]: "RUNNING", ids[1]: "PENDING"}  # nothing cancelled
    finally:
        launch_main(["cancel", str(run)])


def test_sweep_submits_the_shared_stage_once_within_max_jobs(slurm, tmp_path, manifest_path):
    from launch.sweep import load_sweep, submit_sweep
    from tests.test_sweep import write_sweep

    path = write_sweep(tmp_path, manifest_path, grid={"s2/teacher.temperature": [1.0, 2.0]})
    run = tmp_path / "sweep"
    settings, _ = submit_sweep(load_sweep(path), run, "slurm", max_jobs=3)
    final = wait_for_chain(run, poll_s=2, timeout_s=CHAIN_TIMEOUT_S)
    assert {r.state for r in final.jobs.values()} == {"COMPLETED"}
    assert len(final.jobs) == 7  # s1 once; s2, e2 and e2 on heldout per setting
    [stage1] = [n for n in final.jobs if n.startswith("s1-")]
    assert final.jobs[stage1].submissions == [final.jobs[stage1].job_id]
    ids = {name: record.job_id for name, record in final.jobs.items()}
    wait_for_sacct(list(ids.values()), "COMPLETED")
    times = {name: job_times(job_id) for name, job_id in ids.items()}
    for setting in settings:  # each job started after the job it depends on ended
        names = setting.job_names
        assert times[names["s1"]][1] <= times[names["s2"]][0]
        for evaluation in ("e2", "e2_heldout"):
            assert times[names["s2"]][1] <= times[names[evaluation]][0]
    submitted = {}
    for name, job_id in ids.items():
        done = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-o", "Submit,End", "-j", job_id],
            capture_output=True,
            text=True,
        )
        submitted[name] = done.stdout.strip().splitlines()[0].split("|")
    for moment, _ in submitted.values():  # never more than 3 of the sweep's jobs in the queue
        queued = [n for n, (s, e) in submitted.items() if s <= moment < e]
        assert len(queued) <= 3, (moment, queued)
    assert launch_main(["report", str(run)]) == 0
    assert "**Chosen on heldout**" in (run / "sweep.md").read_text()
