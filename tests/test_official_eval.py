"""``cil eval`` agrees with the official Cityscapes pixel-level evaluation.

A small synthetic Cityscapes (256x128 "full resolution") is packed by ``cil-shards pack`` at
128x64 with the val labels kept at 256x128, as the paper evaluates (input 1024x512, labels
2048x1024). A seeded random ERFNet is evaluated by the real ``cil eval --export-predictions``;
``cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling`` then scores the exported PNGs
against the synthetic ``gtFine/val`` (label ids and instance ids), and its per-class IoU and
class average must equal ``cil eval``'s task set "123".
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset
import yaml
from PIL import Image

from cil_dist import cli
from cil_dist.config import AugmentConfig, DataConfig
from cil_dist.data.transforms import SampleError, SegmentationTransform, normalize
from cil_dist.model import ERFNet
from cil_dist.protocol import TaskProtocol
from cil_dist.training.checkpoint import save_checkpoint
from cil_dist.training.train import public_config
from shards import cli as shards_cli
from shards.synth import generate
from tests.helpers import tiny_train_config

SOURCE = (256, 128)  # the synthetic frames and their (full-resolution) labels
STORED = (128, 64)  # pack --size and data.resize: what the model sees
#: The official script as ``python -m`` would run it. cityscapesscripts 2.3.0 still calls
#: ``np.in1d`` (removed in NumPy 2.4); ``np.isin`` is the same test with the element's shape,
#: which the script reshapes to anyway.
OFFICIAL = (
    "import numpy, runpy; numpy.in1d = numpy.isin; runpy.run_module("
    "'cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling', run_name='__main__')"
)


@pytest.fixture(scope="module")
def protocol() -> TaskProtocol:
    """The paper's tasks and val cities, one train city per task (the val split is scored)."""
    data = TaskProtocol.load("cityscapes_cil").to_dict()
    for task in data["tasks"]:
        task["cities"] = task["cities"][:1]
    data["heldout"]["cities"] = []
    return TaskProtocol.from_dict(data)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("official_eval")


@pytest.fixture(scope="module")
def cityscapes(work, protocol) -> Path:
    root = work / "cityscapes"
    generate(root, protocol, images_per_city=2, size=SOURCE, seed=0)
    return root


@pytest.fixture(scope="module")
def manifest(work, cityscapes, protocol) -> str:
    tasks = work / "tasks.yaml"
    tasks.write_text(yaml.safe_dump(protocol.to_dict()))
    out = work / "shards"
    args = ["pack", "--cityscapes", str(cityscapes), "--out", str(out), "--tasks", str(tasks)]
    assert shards_cli.main([*args, "--size", "x".join(map(str, STORED)), "--workers", "2"]) == 0
    return str(out / "manifest.json")


def val_images(cityscapes: Path) -> torch.Tensor:
    """The val photos as the evaluation feeds them (resized to STORED, normalised)."""
    cfg = DataConfig()
    images = [
        np.asarray(Image.open(path).convert("RGB").resize(STORED, Image.BILINEAR))
        for path in sorted(cityscapes.glob("leftImg8bit/val/*/*_leftImg8bit.png"))
    ]
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return normalize(batch, tuple(cfg.mean), tuple(cfg.std))


def balanced_random_erfnet(images: torch.Tensor) -> ERFNet:
    """A seeded random ERFNet whose output channels are standardised on ``images``, so that
    its argmax picks most of the 19 classes (a plain random one predicts a handful)."""
    torch.manual_seed(0)
    model = ERFNet(19).eval()
    with torch.no_grad():
        logits = model(images)
        mean, std = logits.mean((0, 2, 3)), logits.std((0, 2, 3))
        head = model.decoder.output_conv
        head.weight /= std.view(1, -1, 1, 1)
        head.bias.copy_((head.bias - mean) / std)
    return model


@pytest.fixture(scope="module")
def cil_eval(work, cityscapes, manifest, protocol) -> tuple[dict, Path]:
    """``cil eval --export-predictions`` of a random model: (metrics of "123", PNG folder)."""
    checkpoint = work / "random.pt"
    cfg = tiny_train_config(manifest, work / "runs")
    cfg.data.resize = list(STORED)
    model = balanced_random_erfnet(val_images(cityscapes))
    save_checkpoint(
        checkpoint,
        model=model.state_dict(),
        config=public_config(cfg),
        protocol=protocol.to_dict(),
    )
    out, predictions = work / "eval", work / "predictions"
    args = ["eval", "--checkpoint", str(checkpoint), "--task-sets", "123", "--out", str(out)]
    assert cli.main([*args, "--export-predictions", str(predictions)]) == 0
    return json.loads((out / "metrics.json").read_text())["123"], predictions


def official(cityscapes: Path, predictions: Path, export: Path) -> dict:
    """The official pixel-level evaluation of ``predictions``; its result JSON."""
    export.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        CITYSCAPES_DATASET=str(cityscapes),
        CITYSCAPES_RESULTS=str(predictions),
        CITYSCAPES_EXPORT_DIR=str(export),
    )
    run = subprocess.run(
        [sys.executable, "-c", OFFICIAL], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads((export / "resultPixelLevelSemanticLabeling.json").read_text())


def disagreement(ours: dict, theirs: dict) -> float:
    """Largest |difference| of per-class IoU and class average (inf if only one is NaN)."""
    pairs = [(ours["iou"][name], theirs["classScores"][name]) for name in ours["iou"]]
    pairs.append((ours["miou"], theirs["averageScoreClasses"]))
    worst = 0.0
    for a, b in pairs:
        if math.isnan(a) or math.isnan(b):
            worst = worst if math.isnan(a) and math.isnan(b) else math.inf
        else:
            worst = max(worst, abs(a - b))
    return worst


def test_predictions_are_exported_at_full_label_resolution(cityscapes, cil_eval):
    _, predictions = cil_eval
    truths = sorted(cityscapes.glob("gtFine/val/*/*_gtFine_labelIds.png"))
    exported = sorted(predictions.glob("*_leftImg8bit.png"))
    assert [p.name.split("_leftImg8bit")[0] for p in exported] == [
        p.name.split("_gtFine")[0] for p in truths
    ]
    for path in exported:
        assert Image.open(path).size == SOURCE, path.name


def test_official_evaluation_agrees_with_cil_eval(cityscapes, cil_eval, work, protocol):
    ours, predictions = cil_eval
    theirs = official(cityscapes, predictions, work / "official")
    assert sorted(ours["iou"]) == sorted(protocol.class_names)
    assert disagreement(ours, theirs) < 1e-4, (ours, theirs["classScores"])
    scored = [v for v in ours["iou"].values() if not math.isnan(v) and v > 0]
    assert len(scored) >= 8  # a non-trivial comparison: many classes hit
    assert not math.isnan(theirs["classInstScores"]["car"])  # instanceIds were read


def test_the_comparison_catches_shifted_predictions(cityscapes, cil_eval, work):
    ours, predictions = cil_eval
    shifted = work / "shifted"
    shifted.mkdir()
    for path in predictions.glob("*.png"):
        ids = np.roll(np.asarray(Image.open(path)), 9, axis=1)
        Image.fromarray(ids).save(shifted / path.name)
    theirs = official(cityscapes, shifted, work / "official_shifted")
    assert disagreement(ours, theirs) > 1e-3


def test_eval_reads_full_size_val_labels_training_refuses_them(manifest):
    shard = Path(manifest).parent / "val" / "val-000000.tar"
    sample = next(iter(webdataset.WebDataset(str(shard), shardshuffle=False)))
    assert json.loads(sample["meta.json"])["label_size"] == list(SOURCE)
    mean, std = DataConfig().mean, DataConfig().std
    evaluation = SegmentationTransform(STORED, tuple(mean), tuple(std))
    image, label, _ = evaluation(sample, np.random.default_rng(0))
    assert image.shape == (3, STORED[1], STORED[0]) and label.shape == (SOURCE[1], SOURCE[0])
    training = SegmentationTransform(
        STORED, tuple(mean), tuple(std), augment=AugmentConfig(crop=[96, 48])
    )
    with pytest.raises(SampleError, match=r"image is 128x64, label 256x128"):
        training(sample, np.random.default_rng(0))
    forged = {**sample, "meta.json": json.dumps({"label_size": list(STORED)}).encode()}
    with pytest.raises(SampleError, match=r"image is 128x64, label 256x128"):
        evaluation(forged, np.random.default_rng(0))
