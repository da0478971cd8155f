"""Chains on a real 3-node SLURM cluster: each slurmd in its own network and UTS namespace.

``launch/slurm/multinode_cluster.sh`` runs slurmctld/slurmdbd on the host and nodes cilnode1..3
(198.18.0.11..13) behind a bridge, so rank 0 and rank 1 of a ``nodes: 2, tasks_per_node: 1``
stage run on different hosts and talk over gloo between namespaces; the third node is the spare
a requeued job moves to. The session fixture starts the cluster (beside the single-node one of
``test_slurm.py``) and stops it afterwards, unless it was already running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from launch import state as st
from launch.chain import load_chain
from launch.monitor import refresh, wait_for_chain
from launch.slurm_states import sacct_states
from launch.submit import submit_chain
from tests.chains import cluster, cluster_running, final_weights, write_chain

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "slurm" / "multinode_cluster.sh"
CONF = os.environ.get("CIL_SLURM_MN_DIR", "/tmp/cil-slurm-mn") + "/etc/slurm.conf"
NODES = ("cilnode1", "cilnode2", "cilnode3")
CHAIN_TIMEOUT_S = 300
TWO_NODES = {"nodes": 2, "tasks_per_node": 1}
EPOCHS = 12  # of the stage that loses a node: it is killed after the first checkpoint

logger = logging.getLogger(__name__)


def namespaces_unavailable() -> str:
    """Why this machine cannot host the cluster ('' when it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, bridge)"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if subprocess.run(["unshare", "--uts", "--net", "true"], capture_output=True).returncode:
        return "unshare --uts --net is not permitted here"
    return ""


@pytest.fixture(scope="session")
def multinode():
    """The running 3-node cluster's slurm.conf."""
    why = namespaces_unavailable()
    if why:
        pytest.skip(f"multi-node SLURM cluster: {why}")
    was_running = cluster_running(CONF)
    started = cluster("start", SCRIPT)  # also restarts a node left dead
    assert started.returncode == 0, f"multi-node SLURM cluster did not start:\n{started.stderr}"
    yield CONF
    if not was_running:
        cluster("stop", SCRIPT)


@pytest.fixture
def slurm_conf(multinode, monkeypatch) -> str:
    """Point sbatch, sacct and submitit at the multi-node cluster for one test."""
    monkeypatch.setenv("SLURM_CONF", multinode)
    return multinode


def one_stage(folder: Path, manifest: str, resources: dict, epochs: int, **extra) -> Path:
    stages = {"s1": {"method": "cil", "stage": 1, "resources": resources}}
    return write_chain(folder, manifest, stages, epochs=epochs, **extra)


def test_two_node_stage_has_a_rank_per_node_and_matches_one_node(
    slurm_conf, tmp_path, manifest_path
):
    runs = {}
    for name, resources in (("two", TWO_NODES), ("one", {"nodes": 1, "tasks_per_node": 2})):
        path = one_stage(tmp_path / name, manifest_path, resources, epochs=2)
        runs[name] = tmp_path / name / "run"
        submit_chain(load_chain(str(path)), runs[name], "slurm")
    for run in runs.values():
        final = wait_for_chain(run, poll_s=1, timeout_s=CHAIN_TIMEOUT_S)
        assert final.jobs["s1"].state == st.COMPLETED, final.jobs["s1"]
    hosts = [r["host"] for r in st.rank_records(runs["two"], "s1")]  # each rank's gethostname()
    assert len(set(hosts)) == 2 and set(hosts) < set(NODES), hosts
    assert set(st.rank_records(runs["one"], "s1")[i]["host"] for i in (0, 1)) < set(NODES)
    assert st.read_status(runs["two"], "s1")["world_size"] == 2
    two, one = final_weights(runs["two"], "s1"), final_weights(runs["one"], "s1")
    assert two.keys() == one.keys()
    for key in two:
        assert (two[key] == one[key]).all(), key


def node_pids(node: str) -> list[int]:
    listed = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True)
    return [int(pid) for pid in listed.stdout.split()]


def kill_node(node: str) -> list[int]:
    """SIGKILL every process of the node: its slurmd, slurmstepd and the ranks it runs."""
    pids = node_pids(node)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    return pids


def slurmd_pid(node: str) -> int:
    return int((Path(CONF).parents[1] / f"slurmd-{node}.pid").read_text())


def submit_until_checkpoint(path: Path, run: Path) -> tuple[str, int]:
    """Submit the one-stage chain at ``path``; once stage s1 has written a checkpoint: its job
    id and the epochs that checkpoint holds."""
    job_id = submit_chain(load_chain(str(path)), run, "slurm").jobs["s1"].job_id
    checkpoints = run / "stages" / "s1" / "checkpoints"
    deadline = time.monotonic() + CHAIN_TIMEOUT_S
    while not list(checkpoints.glob("epoch_*.pt")):
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.2)
    return job_id, max(int(p.stem.split("_")[1]) for p in checkpoints.glob("epoch_*.pt"))


def slurm_history(job_id: str) -> str:
    """Every record the accounting database keeps of the job (each attempt), for a failure."""
    listed = subprocess.run(
        ["sacct", "-D", "-X", "-P", "-o", "JobID,State,Start,End,NodeList,Reason", "-j", job_id],
        capture_output=True,
        text=True,
    )
    return listed.stdout + listed.stderr


def node_address(node: str) -> str:
    """The node's address, as the cluster's slurm.conf gives it (``NodeAddr=``)."""
    for line in Path(CONF).read_text().splitlines():
        if line.startswith(f"NodeName={node} "):
            return line.split("NodeAddr=")[1].split()[0]
    raise AssertionError(f"{node} is not in {CONF}")


def job_hosts(run: Path, name: str = "s1") -> list[str]:
    """The host of each rank of the job's current attempt, by rank."""
    return [record["host"] for record in st.rank_records(run, name)]


def resumed_epoch(log: str) -> int:
    """The epoch the second attempt in rank 0's ``log`` resumed at."""
    second = Path(log).read_text().split("attempt 2")[-1]
    return int(second.split("resumed from")[1].split("at epoch ")[1].split(",")[0])


def test_losing_a_node_ends_the_job_and_resubmission_resumes(slurm_conf, tmp_path, manifest_path):
    # dist.timeout_s bounds a collective that never hears from the lost rank; --no-requeue: the
    # job ends as NODE_FAIL for good, and resubmitting the chain resumes it (a new job id)
    resources = {**TWO_NODES, "sbatch": {"no_requeue": True}}
    path = one_stage(tmp_path, manifest_path, resources, EPOCHS, overrides=["dist.timeout_s=20"])
    run = tmp_path / "run"
    job_id, saved = submit_until_checkpoint(path, run)
    first, lost = job_hosts(run)
    assert len(node_pids(first)) > 1  # slurmd, the batch script, srun, rank 0
    assert kill_node(lost)
    killed_at = time.monotonic()
    # the allocation ends (NODE_FAIL) and nothing of the job is left on
    # rank 0's node: rank 0 did not hang at a collective with the lost rank
    while sacct_states([job_id]).get(job_id) in ("RUNNING", "COMPLETING") or node_pids(first) != [
        slurmd_pid(first)
    ]:
        assert time.monotonic() - killed_at < 60, (sacct_states([job_id]), node_pids(first))
        time.sleep(0.5)
    ended_s = time.monotonic() - killed_at
    logger.info("job %s ended %.1f s after %s was killed", job_id, ended_s, lost)
    assert sacct_states([job_id])[job_id] == "NODE_FAIL"
    record = refresh(st.ChainState.load(run)).jobs["s1"]
    assert record.state == st.FAILED and node_address(lost) in record.error, record  # the lost peer
    restarted = cluster("start", SCRIPT)  # brings the lost node back
    assert restarted.returncode == 0, restarted.stderr
    resubmitted = submit_chain(load_chain(str(path)), run, "slurm")
    assert resubmitted.jobs["s1"].job_id != job_id
    final = wait_for_chain(run, poll_s=1, timeout_s=CHAIN_TIMEOUT_S)
    assert final.jobs["s1"].state == st.COMPLETED, final.jobs["s1"]
    resumed_at = resumed_epoch(final.jobs["s1"].log)
    assert saved <= resumed_at < EPOCHS  # at least the checkpoint that existed at the kill
    assert st.read_status(run, "s1")["attempts"] == 2
    assert (run / "stages" / "s1" / "checkpoints" / "final.pt").is_file()


@contextlib.contextmanager
def epilog_delay(node: str, seconds: float):
    """The cluster's epilog holds ``node``'s ended jobs ``seconds`` in COMPLETING meanwhile."""
    assert "Epilog=" in Path(CONF).read_text(), f"{CONF} predates the epilog: restart the cluster"
    marker = Path(CONF).parent / "epilog_delay" / node
    marker.write_text(f"{seconds}\n")
    try:
        yield
    finally:
        marker.unlink(missing_ok=True)


def test_a_job_slurm_requeues_after_losing_a_node_stays_queued_and_resumes(
    slurm_conf, tmp_path, manifest_path
):
    # SLURM's default: a job that lost a node is requeued under the same id; the chain follows
    # it (PENDING, its dependent still queued) instead of recording the lost attempt as failed,
    # and the job resumes on the surviving node and the spare
    path = one_stage(
        tmp_path,
        manifest_path,
        TWO_NODES,
        EPOCHS,
        overrides=["dist.timeout_s=20"],
        evaluations={"e1": {"stage": "s1", "task_sets": ["1"]}},
    )
    run = tmp_path / "run"
    job_id, saved = submit_until_checkpoint(path, run)
    first, lost = job_hosts(run)
    # the accounting database shows NODE_FAIL before PENDING, while the controller still holds
    # the job (COMPLETING on rank 0's node); the epilog widens that moment from milliseconds to
    # 3 s. Refreshing all the while, the chain never takes it for the job's end (nor cancels e1)
    seen = set()
    try:
        with epilog_delay(first, 3):
            assert kill_node(lost)
            killed_at = time.monotonic()
            while sacct_states([job_id]).get(job_id) not in ("PENDING", "REQUEUED"):
                assert time.monotonic() - killed_at < 60, slurm_history(job_id)
                jobs = refresh(st.ChainState.load(run)).jobs
                seen.add((jobs["s1"].state, jobs["e1"].state))
                time.sleep(0.05)
        logger.info("job %s requeued %.1f s after the kill", job_id, time.monotonic() - killed_at)
        queued = {(st.RUNNING, st.PENDING), (st.PENDING, st.PENDING)}
        assert seen <= queued, (seen, slurm_history(job_id))
        # the lost node stays down until the job is done: slurmctld still owes it a step signal
        # for the lost attempt, which would reach the requeued attempt (same job and step id)
        # if that ran there (the kill seen on 2026-12-07 under load, docs/multinode_slurm.md)
        final = wait_for_chain(run, poll_s=1, timeout_s=CHAIN_TIMEOUT_S)
        status = st.read_status(run, "s1")
        assert {name: r.state for name, r in final.jobs.items()} == {
            "s1": st.COMPLETED,
            "e1": st.COMPLETED,
        }, (status.get("traceback"), final.jobs["s1"].error, slurm_history(job_id))
        assert final.jobs["s1"].job_id == job_id  # SLURM's requeue, not a resubmission
        assert status["attempts"] == 2
        hosts = job_hosts(run)
        assert lost not in hosts and first in hosts, hosts
        resumed_at = resumed_epoch(final.jobs["s1"].log)
        assert saved <= resumed_at < EPOCHS
    finally:
        restarted = cluster("start", SCRIPT)  # brings the lost node back
        assert restarted.returncode == 0, restarted.stderr
