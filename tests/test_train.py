"""The trainer: frozen inference-mode teacher, real 2-process DDP, resume, bad wiring."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from cil_dist.config import ConfigError
from cil_dist.distributed import DistEnv, cleanup_distributed, init_distributed
from cil_dist.training import checkpoint as ckpt
from cil_dist.training import run_folder
from cil_dist.training.checkpoint import CheckpointError
from cil_dist.training.teacher import teacher_forward
from cil_dist.training.train import build, run_training, stage_loss, train_one_epoch, train_step
from tests.helpers import run_ranks, tiny_train_config


@pytest.fixture(scope="module")
def stage1_checkpoint(manifest_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stage1")
    return run_training(tiny_train_config(manifest_path, out, name="s1", stage=1))


def graph_leaves(tensor: torch.Tensor) -> set[int]:
    """ids of the leaf tensors an autograd graph accumulates gradients into."""
    seen, stack, leaves = set(), [tensor.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves.add(id(fn.variable))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return leaves


def test_teacher_is_frozen_inference_only_and_outside_the_graph(
    manifest_path, stage1_checkpoint, tmp_path
):
    cfg = tiny_train_config(manifest_path, tmp_path, stage=2, method="cil")
    cfg.teacher.checkpoint = str(stage1_checkpoint)
    env = DistEnv()
    parts = build(cfg, env)
    assert parts.teacher is not None and not parts.teacher.training
    assert not any(p.requires_grad for p in parts.teacher.parameters())
    batch = next(iter(parts.loader))
    images, labels = parts.loader.to_device(batch, env.device)

    teacher_logits = teacher_forward(parts.teacher, images, parts.precision)
    assert teacher_logits.is_inference() and teacher_logits.grad_fn is None
    assert teacher_logits.shape[1] == 5
    with parts.precision.autocast():
        logits = parts.student(images)
    total, _ce, kd = stage_loss(parts.plan, cfg, logits, teacher_logits, labels)
    leaves = graph_leaves(total)
    assert leaves >= {id(p) for p in parts.student.parameters()}
    assert not leaves & {id(p) for p in parts.teacher.parameters()}
    assert kd.item() > 0

    before = [p.detach().clone() for p in parts.teacher.parameters()]
    train_step(parts, cfg, batch, env)
    assert all(p.grad is None for p in parts.teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, parts.teacher.parameters(), strict=True))
    assert all(p.grad is not None for p in parts.student.parameters())


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("epochs", 0, r"optim\.epochs: must be >= 1, got 0"),
        ("lr", -1.0, r"optim\.lr must be > 0"),
    ],
)
def test_optimiser_settings_that_train_nothing_are_refused(
    manifest_path, tmp_path, key, value, message
):
    cfg = tiny_train_config(manifest_path, tmp_path, method="joint")
    setattr(cfg.optim, key, value)
    with pytest.raises(ConfigError, match=message):
        build(cfg, DistEnv())


def test_teacher_with_wrong_class_count_is_refused_before_training(
    manifest_path, stage1_checkpoint, tmp_path
):
    cfg = tiny_train_config(manifest_path, tmp_path, stage=3, method="cil")
    cfg.teacher.checkpoint = str(stage1_checkpoint)  # 5 classes; stage 3 needs 11
    with pytest.raises(CheckpointError, match=r"final\.pt.*5 classes.*11"):
        build(cfg, DistEnv())
    cfg.teacher.checkpoint = str(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match=r"nope\.pt.*not found"):
        build(cfg, DistEnv())
    cfg.teacher.checkpoint = ""
    with pytest.raises(ConfigError, match=r"teacher\.checkpoint"):
        build(cfg, DistEnv())


def _ddp_worker(rank: int, manifest: str, out: Path) -> None:
    env = DistEnv.from_environment()
    init_distributed(env)
    try:
        cfg = tiny_train_config(manifest, out, name="ddp", method="joint")
        parts = build(cfg, env)
        for _ in range(2):
            train_one_epoch(parts, cfg, env)
            parts.state.epoch += 1
        steps = torch.tensor([parts.state.step])
        torch.save(
            {"params": dict(parts.bare_student.named_parameters()), "steps": steps},
            out / f"rank{rank}.pt",
        )
    finally:
        cleanup_distributed()


def test_two_process_ddp_keeps_identical_weights(manifest_path, tmp_path):
    run_ranks(_ddp_worker, 2, manifest_path, tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert rank0["steps"].item() == rank1["steps"].item() > 0
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name
    initial = tiny_train_config(manifest_path, tmp_path, method="joint")
    fresh = build(initial, DistEnv()).bare_student
    assert not torch.equal(
        fresh.decoder.output_conv.weight, rank0["params"]["decoder.output_conv.weight"]
    )


def three_joint_epochs(manifest: str, out: Path, name: str):
    """A joint run of 3 epochs keeping every periodic checkpoint."""
    cfg = tiny_train_config(manifest, out, name=name, method="joint")
    cfg.optim.epochs, cfg.checkpoint.keep = 3, 5
    return cfg


def assert_same_final(a: Path, b: Path) -> None:
    first, second = ckpt.load_checkpoint(a), ckpt.load_checkpoint(b)
    assert first["state"] == second["state"]
    for key, value in first["model"].items():
        assert torch.equal(value, second["model"][key]), key


def test_resume_reproduces_the_uninterrupted_run(manifest_path, tmp_path):
    whole = run_training(three_joint_epochs(manifest_path, tmp_path, "whole"))
    interrupted = tmp_path / "interrupted" / "checkpoints"
    interrupted.mkdir(parents=True)
    shutil.copy(
        run_folder.periodic_path(tmp_path / "whole", 1), interrupted
    )  # "crashed" after epoch 1
    resumed = run_training(three_joint_epochs(manifest_path, tmp_path, "interrupted"))
    assert_same_final(whole, resumed)


def test_resume_refuses_a_checkpoint_of_another_stage(manifest_path, stage1_checkpoint, tmp_path):
    cfg = tiny_train_config(manifest_path, tmp_path, name="other", method="joint")
    cfg.checkpoint.resume = str(stage1_checkpoint)
    with pytest.raises(CheckpointError, match=r"final\.pt.*\('cil', 1, 5\)"):
        run_training(cfg)


def test_bf16_autocast_trains_on_cpu(manifest_path, tmp_path):
    cfg = tiny_train_config(manifest_path, tmp_path, name="bf16", method="joint")
    cfg.precision.dtype = "bf16"
    parts = build(cfg, DistEnv())
    batch = next(iter(parts.loader))
    images, _ = parts.loader.to_device(batch, "cpu")
    with parts.precision.autocast():
        assert parts.student(images).dtype == torch.bfloat16
    before = parts.bare_student.decoder.output_conv.weight.detach().clone()
    total, _ce, kd = train_step(parts, cfg, batch, DistEnv())
    assert torch.isfinite(total) and total > 0 and kd.item() == 0
    assert not torch.equal(before, parts.bare_student.decoder.output_conv.weight)


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the Linux kernel reports them."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo to read the CPU's features from")
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_auto_precision_picks_what_the_hardware_runs_natively():
    from cil_dist.config import PrecisionConfig
    from cil_dist.training.precision import build_precision

    # the kernel's word, not torch's: native bf16 on CPU is AVX512-BF16 or AMX-BF16
    native = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    precision = build_precision(PrecisionConfig("auto"), DistEnv())
    assert precision.dtype == (torch.bfloat16 if native else None)
    assert precision.scaler is None
    with pytest.raises(ConfigError, match=r"precision\.dtype: fp16 needs CUDA"):
        build_precision(PrecisionConfig("fp16"), DistEnv())
    with pytest.raises(ConfigError, match=r"precision\.dtype: expected auto"):
        build_precision(PrecisionConfig("int8"), DistEnv())


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    import csv

    with (run_dir / "metrics.csv").open(newline="") as stream:
        return list(csv.DictReader(stream))


def test_validation_curves_and_distillation_diagnostic_per_epoch(
    manifest_path, stage1_checkpoint, tmp_path
):
    def config(name: str):
        cfg = tiny_train_config(manifest_path, tmp_path, name=name, stage=2, method="cil")
        cfg.teacher.checkpoint = str(stage1_checkpoint)
        cfg.optim.epochs, cfg.checkpoint.keep = 2, 5
        cfg.eval.every_epochs, cfg.eval.splits = 1, ["heldout", "val"]
        cfg.tensorboard = True
        return cfg

    run_training(config("whole"))
    rows = metrics_rows(tmp_path / "whole")
    names = {(r["epoch"], r["split"], r["name"]) for r in rows}
    for epoch in ("1", "2"):
        for split in ("heldout", "val"):
            for task_set in ("1", "2", "12"):  # every set the 11-class student covers
                assert (epoch, split, f"{task_set}/mIoU") in names
            assert (epoch, split, "12/road") in names and (epoch, split, "2/pole") in names
            assert (epoch, split, "3/mIoU") not in names
        values = {r["name"]: float(r["value"]) for r in rows if r["epoch"] == epoch}
        assert 0.0 <= values["distill/agreement"] <= 1.0
        assert 0.0 < values["distill/old_mass"] < 1.0
        assert values["kd"] > 0 and values["lr"] > 0
    assert list((tmp_path / "whole" / "tensorboard").glob("events.out.tfevents.*"))

    # resumed after epoch 1: the rows written after that checkpoint are replaced, not repeated
    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    shutil.copy(run_folder.periodic_path(tmp_path / "whole", 1), interrupted / "checkpoints")
    shutil.copy(tmp_path / "whole" / "metrics.csv", interrupted / "metrics.csv")
    run_training(config("interrupted"))
    resumed = metrics_rows(interrupted)
    drop_speed = [{k: v for k, v in r.items()} for r in rows if r["name"] != "images_per_s"]
    assert [r for r in resumed if r["name"] != "images_per_s"] == drop_speed


def test_distillation_diagnostic_counts_agreement_and_old_mass_at_unlabelled_pixels():
    from cil_dist.training.validation import distill_metrics, distill_sums

    teacher = torch.randn(2, 5, 4, 4)
    labels = torch.full((2, 4, 4), 255)
    labels[:, 0] = 6  # the first row is labelled with a new class: not counted
    keeps = torch.cat([teacher, torch.full((2, 6, 4, 4), -30.0)], 1)
    assert distill_metrics(distill_sums(keeps, teacher, labels)) == pytest.approx(
        {"distill/agreement": 1.0, "distill/old_mass": 1.0}
    )
    forgets = torch.cat([-teacher, torch.full((2, 6, 4, 4), 30.0)], 1)
    figures = distill_metrics(distill_sums(forgets, teacher, labels))
    assert figures["distill/old_mass"] < 1e-6
    assert figures["distill/agreement"] == pytest.approx(
        float((teacher.argmin(1) == teacher.argmax(1))[:, 1:].float().mean())
    )


def test_resume_passes_over_a_truncated_checkpoint_and_removes_stale_temporaries(
    manifest_path, tmp_path, capsys
):
    whole = run_training(three_joint_epochs(manifest_path, tmp_path, "whole"))
    folder = tmp_path / "broken" / "checkpoints"
    folder.mkdir(parents=True)
    shutil.copy(run_folder.periodic_path(tmp_path / "whole", 1), folder)
    newest = run_folder.periodic_path(tmp_path / "whole", 2).read_bytes()
    truncated = folder / "epoch_0002.pt"
    truncated.write_bytes(newest[: len(newest) // 2])  # damaged after it was written
    stale = folder / ".epoch_0003.pt.abc123.tmp"  # a write that kill -9 interrupted
    stale.write_bytes(b"half a checkpoint")
    capsys.readouterr()
    # logging replaces pytest's handlers: read stderr
    resumed = run_training(three_joint_epochs(manifest_path, tmp_path, "broken"))
    assert not stale.exists()
    warning = next(line for line in capsys.readouterr().err.splitlines() if "resuming" in line)
    assert str(truncated) in warning and str(folder / "epoch_0001.pt") in warning
    assert_same_final(whole, resumed)


def test_cpu_threads_follow_the_jobs_cpus_per_task():
    from cil_dist.distributed import cpu_threads_per_rank

    assert cpu_threads_per_rank({"OMP_NUM_THREADS": "3", "SLURM_CPUS_PER_TASK": "5"}) == 3
    assert cpu_threads_per_rank({"SLURM_CPUS_PER_TASK": "5", "SLURM_NTASKS_PER_NODE": "2"}) == 5
    cores = len(os.sched_getaffinity(0))
    assert cpu_threads_per_rank({"LOCAL_WORLD_SIZE": "1"}) == cores


def test_a_mid_epoch_checkpoint_resumes_at_its_step_with_identical_weights(manifest_path, tmp_path):
    def config(name: str):
        cfg = tiny_train_config(manifest_path, tmp_path, name=name, method="joint")
        cfg.optim.epochs, cfg.checkpoint.every_steps, cfg.checkpoint.keep = 2, 5, 20
        return cfg

    whole = run_training(config("whole"))
    # every 5 global steps of 17 per epoch: step 25 is the 8th of epoch 2
    mid = run_folder.periodic_path(tmp_path / "whole", 1, 8)
    assert mid.name == "epoch_0001_step_000008.pt" and mid.is_file()
    state = {"epoch": 1, "step": 25, "epoch_step": 8, "samples": 50}  # 25 steps of 2 images
    assert ckpt.load_checkpoint(mid)["state"] == state
    interrupted = tmp_path / "interrupted" / "checkpoints"
    interrupted.mkdir(parents=True)
    shutil.copy(mid, interrupted)  # "preempted" in the middle of epoch 2
    resumed = run_training(config("interrupted"))
    assert_same_final(whole, resumed)
