"""What a (re)submitted chain has to run: the jobs in dependency order, which finished jobs verify
(and are skipped), and the chain state in ``RUN_DIR/chain.json`` carried over from an earlier
submission."""

from __future__ import annotations

import logging
from pathlib import Path

from launch import state as st
from launch.chain import JobSpec
from launch.monitor import refresh

log = logging.getLogger(__name__)


def in_dependency_order(depends_on: dict[str, list[str]]) -> list[str]:
    """Names with each after the names it depends on (the given order otherwise)."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in order:
            for dep in depends_on[name]:
                visit(dep)
            order.append(name)

    for name in depends_on:
        visit(name)
    return order


def topological(jobs: dict[str, JobSpec]) -> list[str]:
    """Job names with every job after the jobs it depends on (config order otherwise)."""
    return in_dependency_order({name: job.depends_on for name, job in jobs.items()})


def launch_order(jobs: dict[str, JobSpec]) -> list[str]:
    """Job names, those with the most jobs waiting on them (directly or not) first, topological
    order among equals: with few slots, a long chain of stages starts before a lone last stage."""
    order = topological(jobs)
    dependents: dict[str, set[str]] = {name: set() for name in jobs}
    for name in reversed(order):  # dependents before the jobs they depend on
        for dep in jobs[name].depends_on:
            dependents[dep] |= {name} | dependents[name]
    rank = {name: index for index, name in enumerate(order)}
    return sorted(jobs, key=lambda name: (-len(dependents[name]), rank[name]))


def output_verifies(job: JobSpec) -> str:
    """Why ``job``'s output is not complete yet ('' when it is)."""
    if job.kind == "eval":
        metrics = Path(job.out_dir) / "metrics.json"
        return "" if metrics.is_file() else f"{metrics} missing"
    from cil_dist.training import checkpoint as ckpt  # torch: only where a checkpoint is read

    try:
        info = ckpt.describe(job.checkpoint)
    except ckpt.CheckpointError as exc:
        return str(exc)
    if not info.complete:
        return f"{job.checkpoint}: not marked complete"
    mine = (job.train.stage.method, job.train.optim.epochs)
    theirs = (info.method, info.epoch)
    return "" if mine == theirs else f"{job.checkpoint}: (method, epochs) {theirs} != {mine}"


def new_state(name: str, run_dir: Path, executor: str, jobs: dict[str, JobSpec]):
    records = {
        name: st.JobRecord(name, job.kind, list(job.depends_on), job.checkpoint, job.out_dir)
        for name, job in jobs.items()
    }
    stamp = st.now()
    return st.ChainState(name, executor, str(run_dir), stamp, stamp, records)


def prepare_state(name: str, run_dir: Path, executor: str, jobs: dict[str, JobSpec]):
    """A fresh state for the jobs of chain (or sweep) ``name``, or the existing one with
    finished jobs marked as skipped."""
    if (run_dir / st.CHAIN_FILE).is_file():
        old = st.ChainState.load(run_dir)
        if set(old.jobs) != set(jobs):
            raise ValueError(
                f"{run_dir / st.CHAIN_FILE}: holds jobs {sorted(old.jobs)}, the chain has "
                f"{sorted(jobs)}; use a new --out folder for a different chain or sweep"
            )
        if old.executor != executor:
            raise ValueError(
                f"{run_dir}: submitted with --executor {old.executor}; resume it with the same"
            )
        refresh(old)
        chain_state = old
    else:
        chain_state = new_state(name, run_dir, executor, jobs)
    for name, job in jobs.items():
        record = chain_state.jobs[name]
        if record.state in (st.PENDING, st.RUNNING):
            continue  # still queued or running on SLURM: keep it
        problem = output_verifies(job)
        record.state, record.error = (st.SKIPPED, "") if not problem else (st.WAITING, "")
    for name in topological(jobs):  # a stage that trains again gets evaluated again
        if chain_state.jobs[name].state != st.WAITING:
            continue
        for dependent in chain_state.dependents(name):
            record = chain_state.jobs[dependent]
            if record.state == st.SKIPPED and record.kind == "eval":
                record.state = st.WAITING
            elif record.state == st.SKIPPED:
                log.warning(
                    "%s is finished but %s, which it builds on, runs again: delete %s to "
                    "retrain it from the new checkpoint",
                    dependent,
                    name,
                    record.out_dir,
                )
    run_dir.mkdir(parents=True, exist_ok=True)
    chain_state.save()
    return chain_state
