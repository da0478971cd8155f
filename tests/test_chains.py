"""Chains without a cluster: config wiring, validation, and a real 2-rank local-executor run."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from launch import state as st
from launch.chain import expand, load_chain
from launch.cli import main as launch_main
from launch.jobs import RENDEZVOUS_PORTS, rendezvous_port
from launch.monitor import pid_alive
from launch.submit import submit_chain
from launch.validate import ChainError, validate_chain
from tests.chains import corrupt_copy, final_weights, write_chain
from tests.helpers import error_lines
from tests.test_erfnet import write_romera_encoder

IMAGENET_ENCODER = "pretrained/erfnet_encoder_pretrained.pth.tar"

THREE_STAGES = {
    "s1": {"method": "cil", "stage": 1},
    "s2": {"method": "cil", "stage": 2, "teacher": "s1"},
    "s3": {"method": "cil", "stage": 3, "teacher": "s2"},
}


def test_shipped_chains_expand_with_teacher_wiring(tmp_path):
    for name in ("cityscapes_cil", "demo_synthetic"):
        chain = load_chain(name)
        jobs = expand(chain, tmp_path)
        for stage, spec in chain.stages.items():
            teacher = jobs[stage].train.teacher.checkpoint
            if spec.teacher:
                assert teacher == jobs[spec.teacher].checkpoint
                assert jobs[stage].depends_on == [spec.teacher]
            else:
                assert teacher == ""
            assert not jobs[stage].train.eval.after_training
            assert jobs[stage].train.out_dir == str(tmp_path / "stages")
        for evaluation, spec in chain.evaluations.items():
            assert jobs[evaluation].depends_on == [spec.stage]
            assert jobs[evaluation].checkpoint == jobs[spec.stage].checkpoint
    paper = expand(load_chain("cityscapes_cil"), tmp_path)
    assert paper["joint"].resources.tasks_per_node == 3  # a stage's resources override
    assert paper["cil_stage2"].resources.gpus_per_node == 2
    for job in (j for j in paper.values() if j.kind == "train"):  # the paper's step everywhere
        assert (
            job.train.data.rank_batch_size(job.resources.world_size) * (job.resources.world_size)
            == 6
        )
        assert job.train.model.sync_batchnorm and job.train.precision.dtype == "fp32"
    assert paper["eval_cil"].resources.timeout_min == 60  # eval_resources
    assert paper["cil_stage3"].train.optim.epochs == 200


def test_paper_stages_start_from_the_imagenet_encoder_and_the_demo_from_scratch(tmp_path):
    from cil_dist.config import load_train_config

    for name in ("paper_stage1", "paper_stage2", "paper_stage3", "paper_joint"):
        assert load_train_config(name, []).model.encoder_init == IMAGENET_ENCODER, name
    assert load_train_config("demo_synthetic", []).model.encoder_init == ""
    # a chain resolves the relative path against the folder it is submitted from
    absolute = str(Path(IMAGENET_ENCODER).resolve())
    for chain, expected in (("cityscapes_cil", absolute), ("demo_synthetic", "")):
        for name, job in expand(load_chain(chain), tmp_path).items():
            if job.kind == "train":
                assert job.train.model.encoder_init == expected, (chain, name)


def test_chain_checks_the_encoder_init_file_before_anything_runs(
    tmp_path, manifest_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)  # model.encoder_init is relative to the working directory
    stages = {key: THREE_STAGES[key] for key in ("s1", "s2")}
    path = write_chain(tmp_path, manifest_path, stages)
    chain = load_chain(str(path), [f"overrides=[model.encoder_init={IMAGENET_ENCODER}]"])
    with pytest.raises(ChainError) as caught:
        validate_chain(chain, tmp_path / "run", "local", str(path))
    absolute = tmp_path.resolve() / IMAGENET_ENCODER  # resolved where the chain is submitted
    assert caught.value.problems == [
        f"stages.{name}: model.encoder_init: {absolute}: not found (download Romera's "
        "ImageNet encoder, trained_models/erfnet_encoder_pretrained.pth.tar of "
        "github.com/Eromera/erfnet_pytorch, or set model.encoder_init='' to train from scratch)"
        for name in stages
    ]
    assert not (tmp_path / "run" / "chain.json").exists()

    (tmp_path / "pretrained").mkdir()
    (tmp_path / IMAGENET_ENCODER).write_text("<html>Not Found</html>")
    with pytest.raises(ChainError, match=r"stages\.s1: model\.encoder_init: .*not a readable"):
        validate_chain(chain, tmp_path / "run", "local", str(path))

    write_romera_encoder(tmp_path / IMAGENET_ENCODER)
    caplog.set_level("INFO", logger="launch.validate")
    jobs = validate_chain(chain, tmp_path / "run", "local", str(path))
    assert [job.train.model.encoder_init for job in jobs.values()] == [str(absolute)] * 2
    assert caplog.text.count("loads as an encoder initialisation") == 1  # read once per file


def test_paper_chain_names_a_missing_imagenet_encoder(tmp_path, manifest_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    chain = load_chain("cityscapes_cil", [f"manifest={manifest_path}"])
    with pytest.raises(ChainError) as caught:
        validate_chain(chain, tmp_path / "run", "local")
    missing = [p for p in caught.value.problems if "model.encoder_init" in p]
    assert [p.split(":")[0] for p in missing] == [f"stages.{name}" for name in chain.stages]
    assert all(f"{IMAGENET_ENCODER}: not found" in p for p in missing)

    write_romera_encoder(tmp_path / IMAGENET_ENCODER)
    with pytest.raises(ChainError) as caught:  # its GPU resources do not fit the local executor
        validate_chain(chain, tmp_path / "run", "local")
    assert not [p for p in caught.value.problems if "model.encoder_init" in p]


def test_invalid_chain_lists_every_problem_before_anything_runs(tmp_path, manifest_path):
    stages = {
        "s1": {"method": "cil", "stage": 1},
        "s2": {"method": "cil", "stage": 2},  # no teacher
        "s3": {"method": "cil", "stage": 3, "teacher": "s1"},  # teacher has 5 classes, not 12
        "j": {"method": "joint", "teacher": "s1"},
        "x": {"method": "distill", "stage": 2, "teacher": "nope"},
    }
    path = write_chain(
        tmp_path,
        manifest_path,
        stages,
        evaluations={"e": {"stage": "s1", "task_sets": ["12", "7"]}},
        report={"row": "missing"},
    )
    chain = load_chain(str(path), ["resources.gpus_per_node=3", "resources.nodes=2"])
    with pytest.raises(ChainError) as caught:
        validate_chain(chain, tmp_path / "run", "local", str(path))
    text = str(caught.value)
    for expected in (
        "stages.s2.teacher: stage 2 needs",
        "stages.s3.teacher: 's1' (cil, stage 1) has 5 classes; stage 3 needs a teacher with the 11",
        "stages.j.teacher: the joint baseline trains without a teacher",
        "stages.x.method: 'distill'",
        "stages.x.teacher: 'nope' is not a stage",
        "evaluations.e.task_sets: '12' needs classes",
        "evaluations.e.task_sets: '7' is not a task set",
        "report.row: 'missing' is not an evaluation",
        "gpus_per_node: 3 GPUs for 2 tasks",
        "the local executor runs on one node, not 2",
    ):
        assert expected in text, f"{expected!r} not in:\n{text}"
    assert not (tmp_path / "run" / "chain.json").exists()


def test_missing_shards_and_unwritable_output_are_reported(tmp_path, manifest_path):
    path = write_chain(tmp_path, manifest_path, {"s1": {"method": "cil", "stage": 1}})
    chain = load_chain(str(path), [f"manifest={tmp_path / 'nowhere' / 'manifest.json'}"])
    with pytest.raises(ChainError, match=r"s1: data.batch_size: 8 training samples, fewer than 2"):
        validate_chain(load_chain(str(path), ["overrides=[data.batch_size=5]"]), tmp_path, "local")
    with pytest.raises(ChainError) as caught:  # the local executor runs 2 ranks
        validate_chain(
            load_chain(
                str(path),
                [
                    'overrides=["data.global_batch_size=3","eval.every_epochs=1","eval.splits=[nope]"]'
                ],
            ),
            tmp_path,
            "local",
        )
    assert "s1: data.global_batch_size: 3 does not divide among 2 ranks" in str(caught.value)
    assert "s1: eval.splits: split 'nope' is not in" in str(caught.value)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ChainError) as caught:
        validate_chain(chain, blocker / "run", "local")
    assert "nowhere/manifest.json" in str(caught.value)
    assert "not writable" in str(caught.value)


@pytest.mark.slow
def test_local_chain_runs_two_ranks_in_order_and_resumes(tmp_path, manifest_path):
    stages = {key: THREE_STAGES[key] for key in ("s1", "s2")}
    path = write_chain(
        tmp_path,
        manifest_path,
        stages,
        evaluations={
            "e1": {"stage": "s1", "task_sets": ["1"]},
            "e2": {"stage": "s2", "task_sets": ["1", "2", "12"]},
        },
        report={"CIL": "e2", "stage 1": "e1"},
        summary={"method": "CIL", "first_stage": "stage 1"},
        overrides=["eval.every_epochs=1"],
    )
    run = tmp_path / "run"
    assert launch_main(["submit", str(path), "--executor", "local", "--out", str(run)]) == 0
    chain = json.loads((run / "chain.json").read_text())
    assert {n: j["state"] for n, j in chain["jobs"].items()} == dict.fromkeys(
        ("s1", "s2", "e1", "e2"), "COMPLETED"
    )
    status = {n: st.read_status(run, n) for n in ("s1", "s2", "e2")}
    assert all(s["world_size"] == 2 for s in status.values())
    assert status["s1"]["finished"] <= status["s2"]["started"]  # dependency order
    for name in ("s1", "s2", "e2"):  # each job met at its own port, below the ephemeral ones
        job_id = chain["jobs"][name]["job_id"]
        port = rendezvous_port(job_id)
        assert port < 32768, port
        line = f"(job {job_id}, 2 rank(s), rendezvous {socket.gethostname()}:{port})"
        assert line in Path(chain["jobs"][name]["log"]).read_text(), (name, line)
    s2_config = (run / "stages" / "s2" / "config.yaml").read_text()
    assert f"checkpoint: {run / 'stages' / 's1' / 'checkpoints' / 'final.pt'}" in s2_config
    metrics = json.loads((run / "evals" / "e2" / "metrics.json").read_text())
    assert set(metrics) == {"1", "2", "12"}
    results = (run / "results.md").read_text()
    assert "| CIL |" in results
    kept = (
        json.loads((run / "evals" / "e2" / "metrics.json").read_text())["1"]["miou"]
        / (json.loads((run / "evals" / "e1" / "metrics.json").read_text())["1"]["miou"])
    )
    assert f"- task 1 kept by CIL after the last stage: **{kept:.3f}** of stage 1's" in results
    assert (run / "curves.png").stat().st_size > 10_000  # both stages' held-out curves
    # continual-learning metrics: the lineage s1 → s2, each class's IoU after each step
    rows = list(csv.DictReader((run / "continual.csv").open()))
    assert [(r["step"], r["task"]) for r in rows] == [("1", "1")] * 5 + [("2", "1")] * 5 + [
        ("2", "2")
    ] * 6
    e1 = json.loads((run / "evals" / "e1" / "metrics.json").read_text())
    e2 = json.loads((run / "evals" / "e2" / "metrics.json").read_text())
    sky = next(r for r in rows if r["step"] == "2" and r["class"] == "sky")
    assert float(sky["iou"]) == pytest.approx(e2["12"]["iou"]["sky"], abs=1e-6)
    lost = 100 * (e1["1"]["miou"] - e2["1"]["miou"])
    then, now = 100 * e1["1"]["miou"], 100 * e2["1"]["miou"]
    assert f"| 1 | s1 | {then:.1f} | {now:.1f} | {lost:.1f} |" in results
    assert (run / "stages" / "s2" / "metrics.csv").is_file()

    # status and report read the run folder without importing torch (seconds on a slow node)
    code = (
        "import sys\nfrom launch.cli import main\n"
        f"assert main(['status', {str(run)!r}]) == main(['report', {str(run)!r}]) == 0\n"
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "False", done.stderr
    assert "| CIL |" in done.stdout  # the report, printed

    # Re-submitting skips every finished job (checkpoints verify) and changes nothing.
    before = final_weights(run, "s2")
    again = submit_chain(load_chain(str(path)), run, "local")
    assert {r.state for r in again.jobs.values()} == {st.SKIPPED}
    after = final_weights(run, "s2")
    assert all((before[k] == after[k]).all() for k in before)

    # An unfinished job (here: its output deleted) runs again; the finished ones stay skipped.
    (run / "evals" / "e2" / "metrics.json").unlink()
    again = submit_chain(load_chain(str(path)), run, "local")
    assert {n: r.state for n, r in again.jobs.items()} == {
        "s1": "SKIPPED",
        "s2": "SKIPPED",
        "e1": "SKIPPED",
        "e2": "COMPLETED",
    }
    assert (run / "evals" / "e2" / "metrics.json").is_file()


@pytest.mark.slow
def test_local_failure_cancels_dependents_and_status_names_the_log(
    tmp_path, shard_dir: Path, manifest_path
):
    broken = corrupt_copy(shard_dir, manifest_path, tmp_path / "shards", "task2/")
    path = write_chain(tmp_path, broken, THREE_STAGES, evaluations={"e3": {"stage": "s3"}})
    run = tmp_path / "run"
    assert launch_main(["submit", str(path), "--executor", "local", "--out", str(run)]) == 1
    states = {n: r.state for n, r in st.ChainState.load(run).jobs.items()}
    assert states == {"s1": "COMPLETED", "s2": "FAILED", "s3": "CANCELLED", "e3": "CANCELLED"}
    record = st.ChainState.load(run).jobs["s2"]
    assert "task2" in record.error and "sha256" in record.error.lower()
    assert Path(record.log).is_file()
    assert launch_main(["status", str(run)]) == 1


@pytest.mark.slow
def test_local_cancel_stops_the_driver_and_its_jobs(tmp_path, manifest_path):
    path = write_chain(
        tmp_path, manifest_path, {k: THREE_STAGES[k] for k in ("s1", "s2")}, epochs=500
    )
    run = tmp_path / "run"
    command = [sys.executable, "-m", "launch.cli", "submit", str(path), "--out", str(run)]
    driver = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while st.read_status(run, "s1").get("state") != "RUNNING":
        assert time.monotonic() < deadline and driver.poll() is None, "s1 never started"
        time.sleep(0.2)
    job_pid = st.read_status(run, "s1")["pid"]
    assert launch_main(["cancel", str(run)]) == 0
    assert driver.wait(timeout=60) == 130
    states = {n: r.state for n, r in st.ChainState.load(run).jobs.items()}
    assert states == {"s1": "CANCELLED", "s2": "CANCELLED"}
    while time.monotonic() < deadline and pid_alive(str(job_pid)):
        time.sleep(0.2)
    assert not pid_alive(str(job_pid)), "the stage's rank 0 survived the cancel"


def test_debug_executor_runs_the_chain_in_this_process(tmp_path, manifest_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # restored afterwards
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # not the job's 1 to begin with (tests/conftest.py sets 1)
    path = write_chain(
        tmp_path,
        manifest_path,
        {"s1": THREE_STAGES["s1"]},
        evaluations={"e1": {"stage": "s1", "task_sets": ["1"]}},
    )
    run = tmp_path / "run"
    try:
        chain_state = submit_chain(load_chain(str(path)), run, "debug")
        # the job's cpus_per_task (1, the default), not this machine's cores // 1 rank
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert {n: r.state for n, r in chain_state.jobs.items()} == {
        "s1": "COMPLETED",
        "e1": "COMPLETED",
    }
    assert st.read_status(run, "s1")["world_size"] == 1
    assert (run / "evals" / "e1" / "metrics.json").is_file()


def test_lineages_follow_the_teachers_from_stage_1_and_leave_out_joint():
    from launch.continual import lineages

    assert lineages(load_chain("reproduce_synthetic")) == {
        "cil_stage3": ["stage1", "cil_stage2", "cil_stage3"],
        "finetune_stage3": ["stage1", "finetune_stage2", "finetune_stage3"],
    }


def test_a_chain_and_cil_train_word_the_same_mistake_alike(tmp_path, manifest_path):
    """One rule per mistake (cil_dist.config): the chain validation lists, under its stage's
    key, the very words ``cil train`` ends with (one line, exit code 2)."""
    from cil_dist.training.train import run_training
    from tests.helpers import tiny_train_config

    first = run_training(tiny_train_config(manifest_path, tmp_path / "s1", name="s1", stage=1))
    base = tmp_path / "train.yaml"
    base.write_text(OmegaConf.to_yaml(OmegaConf.structured(
        tiny_train_config(manifest_path, tmp_path / "runs"))))  # fmt: skip
    s1 = {"method": "cil", "stage": 1}
    cases = [  # (cil train --set, its key), (the chain's stages and overrides, its key), words
        ((["stage.method=distill"], "stage.method: "),
         ({"x": {"method": "distill", "stage": 1}}, [], "stages.x.method: "),
         "'distill' is not one of cil, finetune, joint"),
        ((["stage.stage=2"], "teacher.checkpoint: "),
         ({"s1": s1, "s2": {"method": "cil", "stage": 2}}, [], "stages.s2.teacher: "),
         "stage 2 needs the final checkpoint of stage 1"),
        ((["stage.method=joint", f"teacher.checkpoint={first}"], "teacher.checkpoint: "),
         ({"s1": s1, "j": {"method": "joint", "teacher": "s1"}}, [], "stages.j.teacher: "),
         "the joint baseline trains without a teacher"),
        ((["stage.stage=3", f"teacher.checkpoint={first}"],
          f"{first}: the previous stage's model "),
         ({"s1": s1, "s3": {"method": "cil", "stage": 3, "teacher": "s1"}}, [],
          "stages.s3.teacher: 's1' (cil, stage 1) "),
         "has 5 classes; stage 3 needs a teacher with the 11 classes of tasks < 3"),
        ((["data.batch_size=9"], ""),
         ({"s1": s1}, ["overrides=[data.batch_size=9]"], "s1: "),
         "data.batch_size: 8 training samples, fewer than 1 ranks × batch 9"),
    ]  # fmt: skip
    for index, ((sets, train_key), (stages, chain_sets, chain_key), words) in enumerate(cases):
        done = subprocess.run(
            [Path(sys.executable).parent / "cil", "train", "--config", base, "--set", *sets],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert done.returncode == 2, done.stderr
        errors = error_lines(done.stderr)
        assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
        assert errors[0].split(" ERROR cil: ", 1)[1] == train_key + words, errors
        path = write_chain(tmp_path / f"chain{index}", manifest_path, stages)
        chain = load_chain(str(path), ["resources.tasks_per_node=1", *chain_sets])
        with pytest.raises(ChainError) as caught:
            validate_chain(chain, tmp_path / f"run{index}", "local", str(path))
        assert chain_key + words in caught.value.problems, caught.value.problems


def test_rendezvous_ports_are_below_the_ephemeral_range_and_differ_between_jobs():
    """A multi-rank job's MASTER_PORT comes from its id (every rank and node agrees), below the
    ports the kernel hands out for outgoing connections, and jobs side by side get other ports."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [rendezvous_port(str(job_id)) for job_id in range(2000, 4000)]
    assert all(port in RENDEZVOUS_PORTS and port < low for port in ports)
    assert rendezvous_port("5676") == rendezvous_port("5676")
    assert rendezvous_port("12345_0") != rendezvous_port("12345_1")  # SLURM array tasks
    assert len(set(ports)) > 1800  # 2000 ids: few share a port
