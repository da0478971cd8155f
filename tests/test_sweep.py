"""Sweeps: shared jobs by digest, selection on the held-out split, resume, refusals, seeds."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from launch import state as st
from launch.chain import JobSpec
from launch.cli import main as launch_main
from launch.plan import launch_order
from launch.sweep import SweepConfig, expand_sweep, load_sweep
from launch.validate import ChainError
from tests.chains import write_chain
from tests.test_chains import THREE_STAGES

TWO_STAGES = {key: THREE_STAGES[key] for key in ("s1", "s2")}
GRID = {"teacher.temperature": [1.0, 2.0], "teacher.lambda_gs": [0.0, 1.0]}


def write_sweep(folder: Path, manifest: str, **keys) -> Path:
    """A sweep over a tiny s1 → s2 chain (1 rank per job), e2 scoring s2 on val."""
    chain = write_chain(
        folder,
        manifest,
        TWO_STAGES,
        evaluations={"e2": {"stage": "s2", "task_sets": ["1", "12"]}},
        report={"CIL": "e2"},
        summary={"method": "CIL"},
    )
    text = OmegaConf.create(
        {
            "name": "tiny_sweep",
            "chain": str(chain),
            "set": ["resources.tasks_per_node=1"],
            "grid": GRID,
            "select": {"evaluation": "e2", "task_set": "12"},
            **keys,
        }
    )
    path = folder / "sweep.yaml"
    path.write_text(OmegaConf.to_yaml(text))
    return path


def trained(run: Path, prefix: str) -> list[str]:
    """The training jobs of the sweep whose stage is ``prefix``."""
    jobs = st.ChainState.load(run).jobs
    return sorted(n for n, r in jobs.items() if r.kind == "train" and n.startswith(f"{prefix}-"))


def test_keys_of_stages_without_a_teacher_do_not_split_them(tmp_path, manifest_path):
    # teacher.* on every stage: stage 1 has no teacher, so its four settings are still one job
    path = write_sweep(tmp_path, manifest_path)
    settings, jobs = expand_sweep(load_sweep(path), tmp_path / "run", "local")
    assert len(settings) == 4
    kinds = sorted(name.split("-")[0] for name in jobs)
    assert kinds == sorted(["s1"] + ["s2"] * 4 + ["e2"] * 4 + ["e2_heldout"] * 4)
    stage1 = {s.job_names["s1"] for s in settings}
    assert len(stage1) == 1
    s2 = [jobs[s.job_names["s2"]] for s in settings]
    assert {(j.train.teacher.temperature, j.train.teacher.lambda_gs) for j in s2} == {
        (1.0, 0.0),
        (1.0, 1.0),
        (2.0, 0.0),
        (2.0, 1.0),
    }
    assert all(j.depends_on == [next(iter(stage1))] for j in s2)
    heldout = [jobs[s.job_names["e2_heldout"]] for s in settings]
    assert {(j.split, tuple(j.task_sets)) for j in heldout} == {("heldout", ("12",))}
    # a seed repeats the whole chain: stage 1 once per seed
    seeded = SweepConfig(chain=str(tmp_path / "chain.yaml"), grid={"seed": [0, 1]})
    settings, jobs = expand_sweep(seeded, tmp_path / "run2", "local")
    assert len({s.job_names["s1"] for s in settings}) == 2


def test_bad_sweeps_are_refused_naming_the_entry(tmp_path, manifest_path):
    grids = {
        "unknown": ({"teacher.temprature": [1, 2]}, "grid.teacher.temprature"),
        "empty": ({"teacher.temperature": []}, "grid.teacher.temperature: no values"),
        "none": ({}, "grid: nothing to sweep"),
        "type": ({"optim.epochs": ["one"]}, "grid.optim.epochs"),
        "stage": ({"s9/optim.lr": [0.1]}, "grid.s9/optim.lr: 's9' is not a stage"),
    }
    for folder, (grid, expected) in grids.items():
        path = write_sweep(tmp_path / folder, manifest_path, grid=grid)
        with pytest.raises(ChainError) as caught:
            expand_sweep(load_sweep(path), tmp_path / "run", "local")
        assert expected in str(caught.value), f"{grid}: {caught.value}"
    path = write_sweep(tmp_path, manifest_path)
    cases = {
        "select.metric=accuracy": "select.metric: 'accuracy' is not one of miou",
        "select.evaluation=e9": "select.evaluation: 'e9' is not an evaluation",
        "select.task_set=123": "select.task_set: '123' is not scored by e2",
        "apply_to=[s7]": "apply_to: 's7' is not a stage",
    }
    for override, expected in cases.items():
        with pytest.raises(ChainError) as caught:
            expand_sweep(load_sweep(path, [override]), tmp_path / "run", "local")
        assert expected in str(caught.value), f"{override}: {caught.value}"
    # a value the chain's checks refuse names the settings it concerns
    batch = write_sweep(tmp_path / "batch", manifest_path, grid={"s2/data.batch_size": [2, 64]})
    with pytest.raises(ChainError) as caught:
        expand_sweep(load_sweep(batch), tmp_path / "run", "local")
    [line] = [p for p in caught.value.problems if "data.batch_size" in p]
    assert line.startswith("setting 01 (s2/data.batch_size=64): ") and "s2" in line
    assert "setting 00" not in str(caught.value)
    assert not (tmp_path / "run" / "chain.json").exists()
    # the CLI: exit 2, nothing submitted
    argv = ["sweep", str(path), "--out", str(tmp_path / "r"), "--set", "select.metric=acc"]
    assert launch_main(argv) == 2
    assert not (tmp_path / "r" / "chain.json").exists()


def test_launch_order_starts_long_chains_first():
    def job(name: str, *deps: str) -> JobSpec:
        return JobSpec(name, "train", None, None, list(deps), "", "")  # type: ignore[arg-type]

    jobs = {
        j.name: j
        for j in (
            job("s1"),
            job("c2", "s1"),
            job("c3", "c2"),
            job("f2", "s1"),
            job("f3", "f2"),
            job("f4", "f3"),
            job("joint"),
        )
    }
    order = launch_order(jobs)
    assert order.index("f2") < order.index("c2")  # f2 has 2 jobs waiting on it, c2 one
    assert order.index("c2") < order.index("joint")
    assert order[0] == "s1"


@pytest.mark.slow
def test_sweep_trains_the_shared_stage_once_selects_on_heldout_and_resumes(tmp_path, manifest_path):
    # two settings (7 jobs): the grid's product is checked without training above
    path = write_sweep(tmp_path, manifest_path, grid={"teacher.lambda_gs": [0.0, 1.0]})
    run = tmp_path / "sweep"
    command = [sys.executable, "-m", "launch.cli", "sweep", str(path), "--out", str(run)]
    driver = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    # interrupt it once the shared stage 1 has completed and a stage 2 has started
    while True:
        assert time.monotonic() < deadline and driver.poll() is None, driver.stderr.read()
        if (run / "chain.json").is_file():
            states = {n: st.read_status(run, n).get("state") for n in trained(run, "s2")}
            if st.RUNNING in states.values() or st.COMPLETED in states.values():
                break
        time.sleep(0.2)
    assert launch_main(["cancel", str(run)]) == 0
    assert driver.wait(timeout=60) == 130
    [stage1] = trained(run, "s1")
    assert st.read_status(run, stage1)["state"] == st.COMPLETED
    finished = st.read_status(run, stage1)["finished"]

    # re-running the sweep resumes it: stage 1 is not trained again, everything completes
    assert launch_main(["sweep", str(path), "--out", str(run), "--max-parallel", "2"]) == 0
    chain_state = st.ChainState.load(run)
    assert {r.state for r in chain_state.jobs.values()} <= {st.COMPLETED, st.SKIPPED}
    assert chain_state.jobs[stage1].state == st.SKIPPED
    status = st.read_status(run, stage1)
    assert status["attempts"] == 1 and status["finished"] == finished
    assert trained(run, "s1") == [stage1] and len(trained(run, "s2")) == 2
    for name in trained(run, "s2"):  # each stage 2 learnt from the one stage 1
        config = (run / "stages" / name / "config.yaml").read_text()
        assert f"{stage1}/checkpoints/final.pt" in config

    # the choice is made on held-out, and the report shows val for every setting
    record = json.loads((run / "sweep.json").read_text())
    heldout = {}
    for entry in record["settings"]:
        metrics = run / "evals" / entry["jobs"]["e2_heldout"] / "metrics.json"
        heldout[entry["group"]] = json.loads(metrics.read_text())["12"]["miou"]
    best = max(heldout, key=heldout.get)
    report = (run / "sweep.md").read_text()
    assert f"**Chosen on heldout** (miou of Task 1∪2, {100 * heldout[best]:.1f}): {best}" in report
    rows = list(csv.DictReader((run / "sweep.csv").open()))
    assert len(rows) == 2 and {r["seeds"] for r in rows} == {"1"}
    by_setting = {r["teacher.lambda_gs"]: r for r in rows}
    assert float(by_setting["1.0"]["heldout_mean"]) == pytest.approx(
        100 * heldout["teacher.lambda_gs=1.0"], abs=1e-3
    )
    assert (run / "sweep.png").stat().st_size > 5_000
    # every setting is a chain run folder of its own, with its chain report
    assert "| CIL |" in (run / "settings" / "01" / "results.md").read_text()

    # and a finished sweep runs nothing again
    assert launch_main(["sweep", str(path), "--out", str(run)]) == 0
    assert {r.state for r in st.ChainState.load(run).jobs.values()} == {st.SKIPPED}


@pytest.mark.slow
def test_submit_seeds_reports_mean_and_std(tmp_path, manifest_path):
    chain = write_chain(
        tmp_path,
        manifest_path,
        {"s1": THREE_STAGES["s1"]},
        evaluations={"e1": {"stage": "s1", "task_sets": ["1"]}},
        report={"stage 1": "e1"},
        resources={"tasks_per_node": 1, "timeout_min": 20, "mem_gb": 1},
    )
    run = tmp_path / "seeds"
    argv = ["submit", str(chain), "--out", str(run), "--executor", "debug", "--seeds", "0", "1"]
    assert launch_main(argv) == 0
    assert len(trained(run, "s1")) == 2
    values = []
    for entry in json.loads((run / "sweep.json").read_text())["settings"]:
        metrics = run / "evals" / entry["jobs"]["e1"] / "metrics.json"
        values.append(json.loads(metrics.read_text()))
    mious = [100 * v["1"]["miou"] for v in values]
    mean = sum(mious) / 2
    std = abs(mious[0] - mious[1]) / 2**0.5
    assert f"| stage 1 | {mean:.1f} ± {std:.1f} |" in (run / "sweep.md").read_text()
