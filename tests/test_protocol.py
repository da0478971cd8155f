"""The task protocol YAML and the look-up tables derived from it (the paper's channel table)."""

import re

import numpy as np
import pytest

from cil_dist.protocol import ProtocolError, TaskProtocol

# channel -> Cityscapes label id, copied from the method's channel table
PAPER_CHANNELS = [7, 8, 21, 22, 23, 11, 12, 13, 17, 19, 20, 24, 25, 26, 27, 28, 31, 32, 33]
PAPER_TASK_OF_CHANNEL = [1] * 5 + [2] * 6 + [3] * 8


@pytest.fixture(scope="module")
def paper() -> TaskProtocol:
    return TaskProtocol.load("cityscapes_cil")


def expected_lut(channel_ids: dict[int, int]) -> np.ndarray:
    lut = np.full(256, 255, dtype=np.uint8)
    for label_id, channel in channel_ids.items():
        lut[label_id] = channel
    return lut


def test_paper_protocol_channels_and_cities(paper):
    assert paper.num_classes == 19
    assert [paper.classes_up_to(k) for k in (1, 2, 3)] == [5, 11, 19]
    assert paper.task(1).cities == ("hanover", "aachen", "strasbourg", "dusseldorf")
    assert len(paper.task(2).cities) == 7 and len(paper.task(3).cities) == 6
    assert paper.heldout.cities == ("erfurt",)
    assert paper.val.split == "val" and paper.val.cities == ("frankfurt", "lindau", "munster")
    assert sorted(paper.eval_task_sets) == ["1", "12", "123", "2", "3"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_lut_keeps_only_the_stage_classes(paper, stage):
    want = {
        label_id: channel
        for channel, label_id in enumerate(PAPER_CHANNELS)
        if PAPER_TASK_OF_CHANNEL[channel] == stage
    }
    np.testing.assert_array_equal(paper.stage_lut(stage), expected_lut(want))


def test_joint_lut_maps_all_19(paper):
    want = {label_id: channel for channel, label_id in enumerate(PAPER_CHANNELS)}
    np.testing.assert_array_equal(paper.joint_lut(), expected_lut(want))
    assert (paper.joint_lut()[[0, 1, 4, 6, 9, 10, 14, 15, 16, 18, 29, 30]] == 255).all()


@pytest.mark.parametrize(
    ("task_set", "tasks"), [("1", {1}), ("2", {2}), ("3", {3}), ("12", {1, 2}), ("123", {1, 2, 3})]
)
def test_eval_lut_indexes_within_the_task_set(paper, task_set, tasks):
    channels = [c for c in range(19) if PAPER_TASK_OF_CHANNEL[c] in tasks]
    assert paper.set_channels(task_set) == channels
    want = {PAPER_CHANNELS[c]: i for i, c in enumerate(channels)}
    np.testing.assert_array_equal(paper.eval_lut(task_set), expected_lut(want))


def test_another_split_is_just_a_yaml_file():
    other = TaskProtocol.load("configs/tasks/two_tasks_example.yaml")
    assert [len(t.classes) for t in other.tasks] == [8, 11]
    assert "heldout" not in other.city_sets()
    assert other.stage_lut(2)[24] == 8 + 3  # person is channel 3 of task 2


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["tasks"][0]["classes"].append("unicorn"), "tasks[0].classes"),
        (lambda d: d["tasks"][1]["classes"].append("road"), "more than one task"),
        (lambda d: d["tasks"][1]["cities"].append("aachen"), "disjoint"),
        (lambda d: d["heldout"]["cities"].append("aachen"), "heldout"),
        (lambda d: d["eval_task_sets"].update({"14": [1, 4]}), "eval_task_sets.14"),
        (lambda d: d.update({"taks": []}), "taks"),
        (lambda d: d["tasks"][0]["classes"].append("license plate"), "not an evaluated"),
    ],
)
def test_bad_protocols_name_the_key(paper, mutate, message):
    data = paper.to_dict()
    mutate(data)
    with pytest.raises(ProtocolError, match=re.escape(message)):
        TaskProtocol.from_dict(data, source="bad.yaml")


def test_covered_task_sets_follow_the_models_channels(paper):
    assert paper.covered_task_sets(5) == ["1"]
    assert paper.covered_task_sets(11) == ["1", "2", "12"]
    assert paper.covered_task_sets(19) == ["1", "2", "12", "3", "123"]
    assert paper.covered_task_sets(4) == []
