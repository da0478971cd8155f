"""Submit a chain, watch it, cancel it.

``submit_chain`` validates the whole chain, records it in ``RUN_DIR/chain.json`` and then

* on **SLURM** submits every job at once, each ``afterok`` on its teacher stage (evaluations on
  their stage), and returns — the cluster runs the chain;
* **locally** drives the chain in this process: starts each job once its dependencies have
  completed (at most ``max_parallel`` at a time), and cancels the dependents of a failed job.

Re-submitting into an existing RUN_DIR resumes the chain: jobs whose output is complete and
verifies are skipped, jobs still queued or running on SLURM are kept, the rest are submitted
again (a stage resumes from its latest checkpoint). Locally, a job left running by a driver
that died (kill -9, out of memory) is adopted — waited for, then the chain goes on — and one
whose processes are gone runs again; a chain whose driver still runs is refused.

The parts: :mod:`launch.plan` (what runs, what is skipped), :mod:`launch.dispatch` (submitit
submission, SLURM dependencies), :mod:`launch.local_driver` (the local driver) and
:mod:`launch.monitor` (status and cancel).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

from launch import procs
from launch import state as st
from launch.chain import ChainConfig, JobSpec, chain_to_yaml
from launch.dispatch import submit_slurm
from launch.local_driver import run_locally
from launch.plan import prepare_state
from launch.validate import validate_chain

log = logging.getLogger(__name__)


def submit_chain(
    chain: ChainConfig,
    run_dir: Path,
    executor: str,
    source: str = "chain",
    max_parallel: int = 1,
) -> st.ChainState:
    """Validate, then submit (SLURM) or run (local/debug) every unfinished job of the chain."""
    run_dir = run_dir.resolve()
    jobs = validate_chain(chain, run_dir, executor, source)
    record = functools.partial((run_dir / "chain.yaml").write_text, chain_to_yaml(chain))
    return run_jobs(chain.name, jobs, run_dir, executor, record, max_parallel)


def run_jobs(
    name: str,
    jobs: dict[str, JobSpec],
    run_dir: Path,
    executor: str,
    record: Callable[[], object],
    max_parallel: int = 1,
    max_jobs: int = 0,
) -> st.ChainState:
    """Every unfinished job of a validated chain or sweep: submitted (SLURM) or run here;
    ``record`` writes what the run folder keeps of its config once the state is prepared."""
    refuse_live_driver(run_dir)
    st.cancel_marker(run_dir).unlink(missing_ok=True)
    chain_state = prepare_state(name, run_dir, executor, jobs)
    record()
    if executor == "slurm":
        submit_slurm(chain_state, jobs, run_dir, max_jobs)
    else:
        run_locally(chain_state, jobs, run_dir, executor, max_parallel)
    return chain_state


def refuse_live_driver(run_dir: Path) -> None:
    """A local chain is driven by one process at a time."""
    if not (run_dir / st.CHAIN_FILE).is_file():
        return
    old = st.ChainState.load(run_dir)
    if old.driver_pid and procs.alive(old.driver_pid, old.driver_started):
        raise ValueError(
            f"{run_dir}: this chain is still running (driver pid {old.driver_pid}); wait for it "
            "or stop it with cil-launch cancel"
        )
