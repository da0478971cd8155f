"""Reading srun's report of the tasks that ended badly (:mod:`launch.srun_report`)."""

from __future__ import annotations

from launch.srun_report import (
    TAIL_BYTES,
    TaskEnded,
    first_ended,
    read_first_ended,
    task_numbers,
)

# rank 1 of job 2 SIGKILLed on the test cluster (tests/test_slurm.py), as srun wrote it
KILLED = """\
submitit INFO (2026-12-08 02:46:32,624) - Starting with JobEnvironment(job_id=2, hostname=vm, \
local_rank=0(2), node=0(1), global_rank=0(2))
02:46:32 [rank0] INFO launch.jobs: train s1: attempt 1 (job 2, 2 rank(s), rendezvous vm:22906)
srun: error: vm: task 1: Killed
srun: launch/slurm: _step_signal: Terminating StepId=2.0
slurmstepd-vm: error: *** STEP 2.0 ON vm CANCELLED AT 2026-12-08T02:46:32 ***
submitit WARNING (2026-12-08 02:46:33,288) - Bypassing signal SIGTERM
srun: error: vm: task 0: Killed
srun: Force Terminated StepId=2.0
"""


def test_the_task_srun_saw_end_first_is_named_not_those_it_ended_itself():
    assert first_ended(KILLED) == [TaskEnded(1, "vm", "Killed")]


def test_only_the_last_attempt_counts():
    requeued = KILLED + KILLED.split("\n", 2)[0] + "\n02:50:00 [rank0] INFO still training\n"
    assert first_ended(requeued) == []
    again = requeued + "srun: error: node3: tasks 0,2-3: Out Of Memory\n"
    assert first_ended(again) == [TaskEnded(r, "node3", "Out Of Memory") for r in (0, 2, 3)]


def test_task_lists_and_a_log_without_a_report():
    assert task_numbers("1") == [1]
    assert task_numbers("0-3") == [0, 1, 2, 3]
    assert task_numbers("0,2-3,7") == [0, 2, 3, 7]
    assert (
        first_ended("srun: error: Unable to create step for job 9: Invalid generic resource\n")
        == []
    )


def test_a_missing_log_reports_nothing(tmp_path):
    assert read_first_ended(tmp_path / "9_0_log.out") == []
    (tmp_path / "9_0_log.out").write_text(KILLED)
    assert read_first_ended(tmp_path / "9_0_log.out") == [TaskEnded(1, "vm", "Killed")]


def test_a_long_log_is_read_from_its_end(tmp_path):
    """A long run's log: the report at its end is found in its last megabyte."""
    training = "".join(f"epoch {i}: loss 0.5\n" for i in range(200_000))  # about 4 MB
    log = tmp_path / "9_0_log.out"
    log.write_text(KILLED.split("\n", 1)[0] + "\n" + training + KILLED.split("\n", 2)[2])
    assert log.stat().st_size > 3 * TAIL_BYTES
    assert read_first_ended(log) == [TaskEnded(1, "vm", "Killed")]
