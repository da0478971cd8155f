"""Metrics per task set, the paper-shaped table, and the cross-rank reduction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cil_dist.distributed import DistEnv, cleanup_distributed, init_distributed
from cil_dist.evaluation.metrics import ConfusionMatrix, TaskSetEvaluator
from cil_dist.evaluation.tables import format_paper_table
from cil_dist.evaluation.visualize import channels_to_label_ids, colorize
from tests.helpers import run_ranks


def numpy_iou(pred: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    keep = target != 255
    m = np.zeros((k, k), np.int64)
    np.add.at(m, (target[keep], pred[keep]), 1)
    tp = np.diag(m).astype(float)
    union = m.sum(0) + m.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def test_confusion_matrix_equals_numpy():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 4, (3, 20, 30))
    target = rng.integers(0, 4, (3, 20, 30))
    target[rng.random(target.shape) < 0.2] = 255
    target[target == 3] = 1  # class 3 never in the ground truth, but predicted → IoU 0
    cm = ConfusionMatrix(5)
    cm.update(torch.tensor(pred), torch.tensor(target))
    want = numpy_iou(pred, target, 5)
    got = cm.iou().numpy()
    np.testing.assert_allclose(got, want)
    assert math.isnan(got[4]) and got[3] == 0.0  # absent in both → NaN, skipped in the mean
    assert cm.miou() == pytest.approx(np.nanmean(want))


def test_task_set_evaluator_restricts_the_argmax(paper_protocol):
    evaluator = TaskSetEvaluator(paper_protocol, 11, ["1", "2", "12"])
    labels = torch.tensor([[[7, 11, 23, 0]]])  # road, building, sky, unlabeled
    logits = torch.zeros(1, 11, 1, 4)
    logits[0, 0, 0, 0] = 5.0  # road right
    logits[0, 5, 0, 1] = 5.0  # building right
    logits[0, 4, 0, 2] = 1.0  # sky right, but ...
    logits[0, 6, 0, 2] = 9.0  # ... wall (task 2) wins outside task set 1
    evaluator.update(logits, labels)
    results = evaluator.results()
    assert results["1"]["miou"] == 1.0  # road + sky, wall's channel is outside set 1
    assert results["1"]["pixels"] == 2
    assert results["12"]["iou"]["sky"] == 0.0 and results["12"]["iou"]["road"] == 1.0
    assert results["2"]["iou"]["building"] == 1.0 and results["2"]["pixels"] == 1
    with pytest.raises(ValueError, match=r"task set '3'.*11 output channels"):
        TaskSetEvaluator(paper_protocol, 11, ["3"])


def _reduce_worker(rank: int, pred: torch.Tensor, target: torch.Tensor, out) -> None:
    init_distributed(DistEnv.from_environment())
    try:
        cm = ConfusionMatrix(4)
        cm.update(pred[rank::2], target[rank::2])
        cm.reduce()
        torch.save(cm.matrix, out / f"cm{rank}.pt")
    finally:
        cleanup_distributed()


def test_two_rank_reduce_equals_one_process(tmp_path):
    gen = torch.Generator().manual_seed(1)
    pred = torch.randint(0, 4, (6, 8, 8), generator=gen)
    target = torch.randint(0, 4, (6, 8, 8), generator=gen)
    run_ranks(_reduce_worker, 2, pred, target, tmp_path)
    single = ConfusionMatrix(4)
    single.update(pred, target)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"cm{rank}.pt"), single.matrix)


def test_paper_table_shape():
    table = format_paper_table(
        {
            "CIL": {"1": 0.845, "2": 0.578, "12": 0.64, "3": 0.684, "123": 0.622},
            "joint": {"1": 0.881, "123": float("nan")},
        }
    )
    assert table.splitlines() == [
        "| model | Task 1 | Task 2 | Task 1∪2 | Task 3 | Task 1∪2∪3 |",
        "|---|---|---|---|---|---|",
        "| CIL | 84.5 | 57.8 | 64.0 | 68.4 | 62.2 |",
        "| joint | 88.1 | – | – | – | – |",
    ]


def test_colours_and_label_id_export(paper_protocol):
    names = paper_protocol.class_names
    channel_map = np.array([[0, 4, 13, 255]], np.uint8)
    assert colorize(channel_map, names).tolist() == [
        [[128, 64, 128], [70, 130, 180], [0, 0, 142], [0, 0, 0]]
    ]
    assert channels_to_label_ids(channel_map, names).tolist() == [[7, 23, 26, 0]]


def test_results_with_nan_are_written_as_valid_json_with_null(tmp_path, paper_protocol):
    import json

    from cil_dist.evaluation.evaluate import write_results

    results = {"1": {"miou": 0.5, "iou": {"road": 0.5, "sky": math.nan}, "pixels": 10}}
    write_results(results, paper_protocol, tmp_path, "run")

    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    written = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse)
    assert written["1"]["iou"] == {"road": 0.5, "sky": None}
    table = (tmp_path / "table.md").read_text()
    assert "| sky | – |" in table and "| road | 50.0 |" in table
