"""The synthetic Cityscapes generator: layout, determinism, label content and the official
Cityscapes encodings of its instance and colour images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import id2label
from PIL import Image

from cil_dist import labels
from cil_dist.protocol import TaskProtocol
from shards.synth import (
    SynthSummary,
    _Canvas,
    _car,
    _rider_on,
    frame_name,
    generate,
    instance_ids,
)
from tests.conftest import TINY_SIZE

#: Ground-truth files the generator writes per frame, beside the ``_leftImg8bit.png`` photo.
GT_KINDS = ("labelIds", "instanceIds", "color")

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
                files |= {f"gtFine/{stem}_gtFine_{kind}.png" for kind in GT_KINDS}
    return files


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _label_frames(root: Path) -> list[tuple[str, np.ndarray]]:
    return [
        (path.name, np.asarray(Image.open(path)))
        for path in sorted(root.glob("gtFine/*/*/*_gtFine_labelIds.png"))
    ]


def _gt_frames(root: Path) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(name, label ids, instance ids, colour) of every frame, read back from the PNGs."""
    frames = []
    for name, label in _label_frames(root):
        path = next(root.glob(f"gtFine/*/*/{name}"))
        instances = np.asarray(Image.open(str(path).replace("labelIds", "instanceIds")))
        color = np.asarray(Image.open(str(path).replace("labelIds", "color")))
        frames.append((name, label, instances, color))
    return frames


#: Label ids of the classes with instances in the official table (person, rider, car, …).
THINGS = sorted(i for i, label in id2label.items() if i >= 0 and label.hasInstances)


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
        instance_path = str(label_path).replace("labelIds", "instanceIds")
        with (
            Image.open(instance_path) as instances,
            Image.open(str(label_path).replace("labelIds", "color")) as color,
        ):
            # 16-bit grayscale like the official instanceIds; RGBA like json2labelImg's colour
            assert (instances.mode, instances.size) == ("I;16", TINY_SIZE)
            assert (color.mode, color.size) == ("RGBA", TINY_SIZE)


def test_summary_counts_frames_per_split(one_per_city, paper_protocol):
    root, summary = one_per_city
    train_cities = len(paper_protocol.train_cities()) + len(paper_protocol.heldout.cities)
    assert summary == SynthSummary(
        root, {"train": train_cities, "val": len(paper_protocol.val.cities)}, TINY_SIZE, 0
    )
    assert summary.total * (1 + len(GT_KINDS)) == len(_files(root))


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


def test_instance_ids_refine_label_ids(synth_root):
    things = np.zeros(256, bool)
    things[THINGS] = True
    for name, label, instances, _ in _gt_frames(synth_root):
        assert instances.dtype == np.uint16, name
        thing = instances >= 1000
        np.testing.assert_array_equal(thing, things[label], err_msg=name)
        np.testing.assert_array_equal(instances[thing] // 1000, label[thing], err_msg=name)
        np.testing.assert_array_equal(instances[~thing], label[~thing], err_msg=name)


def test_instances_of_a_class_are_numbered_from_zero(synth_root):
    cars = 0
    for name, _, instances, _ in _gt_frames(synth_root):
        ids = np.unique(instances[instances >= 1000])
        for class_id in np.unique(ids // 1000):
            numbers = ids[ids // 1000 == class_id] % 1000
            assert numbers.tolist() == list(range(len(numbers))), (name, class_id)
        cars += int(np.sum(ids // 1000 == labels.by_name("car").id))
    assert cars > len(_gt_frames(synth_root))  # frames show several distinct cars


def test_color_image_is_the_palette_of_the_label_ids(synth_root):
    palette = np.zeros((256, 3), np.uint8)
    for label_id, label in id2label.items():
        if label_id >= 0:
            palette[label_id] = label.color
    for name, label, _, color in _gt_frames(synth_root):
        np.testing.assert_array_equal(color[..., :3], palette[label], err_msg=name)
        assert (color[..., 3] == 255).all(), name


def test_distinct_objects_get_distinct_instance_ids():
    """Two overlapping cars and a rider on a bicycle, drawn as the generator draws objects."""
    canvas = _Canvas.blank(64, 128, np.random.default_rng(0))
    draws = [
        lambda: _car(canvas, 40, 50, 12),
        lambda: _car(canvas, 60, 56, 12),  # nearer, hides part of the first car
        lambda: _rider_on(canvas, 100, 60, 20, motor=False),
    ]
    for number, draw in enumerate(draws, start=1):
        canvas.current = number
        draw()
    ids = instance_ids(canvas.lab, canvas.obj)
    car, rider, bicycle = (labels.by_name(n).id for n in ("car", "rider", "bicycle"))
    assert set(np.unique(ids[ids >= 1000]).tolist()) == {
        car * 1000,
        car * 1000 + 1,
        rider * 1000,
        bicycle * 1000,
    }
    first, second = canvas.obj == 1, canvas.obj == 2
    assert (ids[first & (canvas.lab == car)] == car * 1000).all()
    assert (ids[second & (canvas.lab == car)] == car * 1000 + 1).all()


def test_instance_ids_number_objects_per_class_in_drawing_order():
    label = np.array([[26, 26, 17, 24], [26, 26, 25, 33]], np.uint8)
    objects = np.array([[5, 3, 5, 0], [5, 3, 7, 7]], np.int32)  # a pole (17) over object 5
    np.testing.assert_array_equal(
        instance_ids(label, objects), [[26001, 26000, 17, 24000], [26001, 26000, 25000, 33000]]
    )
