"""The synthetic Cityscapes generator: layout, determinism and label content."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cil_dist import labels
from cil_dist.protocol import TaskProtocol
from shards.synth import SynthSummary, frame_name, generate
from tests.conftest import TINY_SIZE

#: Label ids of the 19 classes that Cityscapes evaluates (the ones with a train id).
EVALUATED = {
    int(i)
    for i in np.flatnonzero(labels.valid_label_ids())
    if labels.by_id(int(i)).trainId not in (-1, 255)
}


def _expected_files(protocol: TaskProtocol, images_per_city: int) -> set[str]:
    files = set()
    for city_set in protocol.city_sets().values():
        for city in city_set.cities:
            for i in range(images_per_city):
                stem = f"{city_set.split}/{city}/{frame_name(city, i)}"
                files.add(f"leftImg8bit/{stem}_leftImg8bit.png")
                files.add(f"gtFine/{stem}_gtFine_labelIds.png")
    return files


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _label_frames(root: Path) -> list[tuple[str, np.ndarray]]:
    return [
        (path.name, np.asarray(Image.open(path)))
        for path in sorted(root.glob("gtFine/*/*/*_gtFine_labelIds.png"))
    ]


@pytest.fixture(scope="module")
def one_per_city(tmp_path_factory, paper_protocol) -> tuple[Path, SynthSummary]:
    root = tmp_path_factory.mktemp("one_per_city")
    summary = generate(root, paper_protocol, images_per_city=1, size=TINY_SIZE, seed=0, workers=1)
    return root, summary


def test_frame_names_follow_cityscapes():
    assert frame_name("aachen", 0) == "aachen_000000_000019"
    assert frame_name("aachen", 2) == "aachen_000000_000059"


def test_layout_and_formats(synth_root, paper_protocol):
    assert _files(synth_root) == _expected_files(paper_protocol, images_per_city=2)
    for path in synth_root.glob("leftImg8bit/*/*/*.png"):
        label_path = Path(
            str(path)
            .replace("leftImg8bit", "gtFine", 1)
            .replace("_leftImg8bit.png", "_gtFine_labelIds.png")
        )
        with Image.open(path) as image, Image.open(label_path) as label:
            assert (image.mode, image.size) == ("RGB", TINY_SIZE)
            assert (label.mode, label.size) == ("L", TINY_SIZE)


def test_summary_counts_frames_per_split(one_per_city, paper_protocol):
    root, summary = one_per_city
    train_cities = len(paper_protocol.train_cities()) + len(paper_protocol.heldout.cities)
    assert summary == SynthSummary(
        root, {"train": train_cities, "val": len(paper_protocol.val.cities)}, TINY_SIZE, 0
    )
    assert summary.total * 2 == len(_files(root))


def test_same_seed_gives_identical_bytes_whatever_the_workers(
    tmp_path, one_per_city, synth_root, paper_protocol
):
    root, _ = one_per_city
    generate(tmp_path, paper_protocol, images_per_city=1, size=TINY_SIZE, seed=0, workers=3)
    files = _files(root)
    assert files == _files(tmp_path)
    for name in files:
        assert (root / name).read_bytes() == (tmp_path / name).read_bytes(), name
        # a frame does not depend on how many frames per city were asked for
        assert (root / name).read_bytes() == (synth_root / name).read_bytes(), name


def test_other_seed_gives_other_frames(tmp_path, one_per_city, paper_protocol):
    root, _ = one_per_city
    generate(tmp_path, paper_protocol, images_per_city=1, size=TINY_SIZE, seed=1, workers=2)
    for path in root.glob("leftImg8bit/*/*/*.png"):
        other = tmp_path / path.relative_to(root)
        assert path.read_bytes() != other.read_bytes(), path.name


def test_label_ids_are_valid_cityscapes_ids(synth_root):
    valid = labels.valid_label_ids()
    for name, label in _label_frames(synth_root):
        assert valid[label].all(), f"{name}: invalid ids {np.unique(label[~valid[label]])}"


def test_every_frame_shows_classes_of_every_task(synth_root, paper_protocol):
    task_ids = [{labels.by_name(c).id for c in task.classes} for task in paper_protocol.tasks]
    for name, label in _label_frames(synth_root):
        present = set(np.unique(label).tolist())
        for task, ids in zip(paper_protocol.tasks, task_ids, strict=True):
            assert present & ids, f"{name} shows no class of task {task.id}"


def test_all_evaluated_classes_appear(synth_root):
    present = set()
    for _, label in _label_frames(synth_root):
        present |= set(np.unique(label).tolist())
    missing = {labels.by_id(i).name for i in EVALUATED - present}
    assert len(EVALUATED) == 19
    assert not missing


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"images_per_city": 0}, "images_per_city"), ({"size": (8, 4)}, "size")],
)
def test_rejects_bad_arguments(tmp_path, paper_protocol, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(tmp_path, paper_protocol, **kwargs)
