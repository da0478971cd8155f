"""End to end on synthetic Cityscapes: learning happens, CIL beats fine-tuning on old classes,
evaluation is rank-independent, inference normalises as the run did (the CLIs: test_cli.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cil_dist.config import DataConfig
from cil_dist.data.pipeline import ShardSource, build_eval_loader
from cil_dist.distributed import DistEnv, cleanup_distributed, init_distributed
from cil_dist.evaluation.evaluate import evaluate
from cil_dist.evaluation.metrics import TaskSetEvaluator
from cil_dist.protocol import TaskProtocol
from cil_dist.training.checkpoint import model_from_checkpoint
from cil_dist.training.precision import Precision
from cil_dist.training.train import run_training
from shards.pack import pack
from shards.synth import generate
from tests.helpers import run_ranks, tiny_train_config

SIZE = (128, 64)


@pytest.fixture(scope="module")
def learning_manifest(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("learning")
    protocol = TaskProtocol.load("cityscapes_cil")
    generate(root / "cityscapes", protocol, images_per_city=6, size=SIZE, seed=1)
    pack(root / "cityscapes", str(root / "shards"), protocol, size=SIZE, samples_per_shard=8)
    return str(root / "shards" / "manifest.json")


@pytest.fixture(scope="module")
def runs(learning_manifest, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("runs")

    def train(name: str, stage: int, method: str, epochs: int, teacher: Path | None = None):
        cfg = tiny_train_config(learning_manifest, out, name=name, stage=stage, method=method)
        # random 96x48 crops of the 128x64 frames (the paper's augmentation crops too); val is
        # scored on whole frames. 25 % less CPU than whole-frame training (218 -> 163 s, seed 0)
        cfg.data.augment.crop, cfg.data.batch_size, cfg.data.num_workers = [96, 48], 8, 1
        # fp32 on every CPU: the bars below were calibrated in fp32 (bf16 would move them)
        cfg.optim.epochs, cfg.optim.lr, cfg.precision.dtype = epochs, 2e-3, "fp32"
        cfg.checkpoint.every_epochs, cfg.eval.after_training = 0, True
        cfg.teacher.checkpoint = str(teacher or "")
        return run_training(cfg)

    stage1 = train("stage1", 1, "cil", 28)
    return {
        "stage1": stage1,
        "cil": train("cil2", 2, "cil", 14, stage1),
        "finetune": train("finetune2", 2, "finetune", 14, stage1),
    }


def miou(checkpoint: Path, task_set: str) -> float:
    metrics = json.loads((checkpoint.parent.parent / "eval_val" / "metrics.json").read_text())
    return metrics[task_set]["miou"]


@pytest.mark.slow
def test_learning_happens_and_cil_keeps_old_classes(runs):
    # task-1 mIoU over training seeds 0-3 (seed 0 here; 28 and 14 epochs, fp32, 2026-12-07):
    # stage 1 0.47/0.42/0.32/0.34; after stage 2, CIL 0.27/0.31/0.26/0.27 and fine-tuning
    # 0.08/0.12/0.06/0.10. The bars hold for every one of them. CIL with its distillation term
    # zeroed (seed 0) scored 0.14, the task-1 head's guess without ever seeing task 1: it fails
    assert miou(runs["stage1"], "1") > 0.25  # an untrained task-1 head: about 0.14 (above)
    cil, finetune = miou(runs["cil"], "1"), miou(runs["finetune"], "1")
    assert cil > finetune + 0.1 and cil > 2 * finetune, (cil, finetune)


def _eval_worker(rank: int, checkpoint: Path, manifest: str, out: Path) -> None:
    env = DistEnv.from_environment()
    init_distributed(env)
    try:
        torch.save(confusion(checkpoint, manifest, env), out / f"rank{rank}.pt")
    finally:
        cleanup_distributed()


def confusion(checkpoint: Path, manifest: str, env: DistEnv) -> dict[str, torch.Tensor]:
    model, payload = model_from_checkpoint(str(checkpoint), env.device)
    protocol = TaskProtocol.from_dict(payload["protocol"])
    evaluator = TaskSetEvaluator(protocol, 11, ["1", "2", "12"])
    cfg = DataConfig(manifest=manifest, resize=list(SIZE), eval_batch_size=4, num_workers=1)
    loader = build_eval_loader(cfg, ShardSource.from_manifest(manifest, "val"), env)
    evaluate(model, loader, evaluator, Precision("cpu", None), env)
    return {name: m.matrix for name, m in evaluator.matrices.items()}


@pytest.mark.slow
def test_evaluation_over_two_ranks_equals_one(runs, learning_manifest, tmp_path):
    run_ranks(_eval_worker, 2, runs["cil"], learning_manifest, tmp_path)
    single = confusion(runs["cil"], learning_manifest, DistEnv())
    assert int(single["12"].sum()) > 0
    for rank in range(2):
        matrices = torch.load(tmp_path / f"rank{rank}.pt")
        for name, matrix in single.items():
            assert torch.equal(matrices[name], matrix), (rank, name)


@pytest.mark.slow
def test_infer_normalises_with_the_runs_mean_and_std(runs, synth_root, tmp_path):
    import numpy as np
    from PIL import Image

    from cil_dist.evaluation.infer import infer
    from cil_dist.evaluation.visualize import colorize

    payload = torch.load(runs["stage1"], weights_only=True)
    payload["config"]["data"].update(mean=[0.3, 0.3, 0.3], std=[0.5, 0.5, 0.5])
    checkpoint = tmp_path / "other_stats.pt"
    torch.save(payload, checkpoint)
    image_path = next((synth_root / "leftImg8bit" / "val" / "lindau").glob("*.png"))
    written = infer(str(checkpoint), str(image_path), str(tmp_path / "out"))

    model, _ = model_from_checkpoint(str(checkpoint), "cpu")
    image = Image.open(image_path).convert("RGB")
    pixels = np.asarray(image.resize(tuple(payload["config"]["data"]["resize"])), np.float32)
    tensor = (torch.from_numpy(pixels / 255) - 0.3) / 0.5
    with torch.inference_mode():
        logits = model(tensor.permute(2, 0, 1)[None])
    logits = torch.nn.functional.interpolate(logits, (image.height, image.width), mode="nearest")
    names = TaskProtocol.from_dict(payload["protocol"]).class_names[:5]
    expected = colorize(logits.argmax(1)[0].numpy(), names)
    assert np.array_equal(np.asarray(Image.open(written["segmentation"])), expected)
