"""The class-incremental task protocol, read from YAML (``configs/tasks/*.yaml``).

A protocol lists tasks (their classes and train cities), the held-out and val city sets and the
evaluation task sets. Output channels are ordered by task. From it derive the look-up tables
that turn Cityscapes label ids into training targets or evaluation targets::

    protocol = TaskProtocol.load("cityscapes_cil")
    protocol.stage_lut(2)       # labelId -> channel for task 2's classes, 255 elsewhere
    protocol.joint_lut()        # labelId -> channel for all classes
    protocol.eval_lut("12")     # labelId -> index within task set 1∪2, 255 elsewhere
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cil_dist import labels
from cil_dist.labels import IGNORE


class ProtocolError(ValueError):
    """A task protocol file is malformed; the message names the file and the key."""


@dataclass(frozen=True)
class Task:
    id: int
    classes: tuple[str, ...]
    cities: tuple[str, ...]


@dataclass(frozen=True)
class CitySet:
    split: str
    cities: tuple[str, ...]


@dataclass(frozen=True)
class TaskProtocol:
    name: str
    tasks: tuple[Task, ...]
    heldout: CitySet
    val: CitySet
    eval_task_sets: dict[str, tuple[int, ...]] = field(default_factory=dict)
    source: str = ""

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(cls, name_or_path: str | Path) -> TaskProtocol:
        """Load a protocol from a YAML file or a shipped name such as ``cityscapes_cil``."""
        import configs

        path = configs.find("tasks", name_or_path)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ProtocolError(f"{path}: not valid YAML: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> TaskProtocol:
        """Build and validate a protocol from its YAML mapping."""

        def fail(key: str, why: str) -> ProtocolError:
            return ProtocolError(f"{source}: {key}: {why}")

        if not isinstance(data, dict):
            raise fail("<top>", "expected a mapping")
        unknown = set(data) - {"name", "tasks", "heldout", "val", "eval_task_sets"}
        if unknown:
            raise fail(", ".join(sorted(unknown)), "unknown key(s)")
        raw_tasks = data.get("tasks")
        if not isinstance(raw_tasks, list) or not raw_tasks:
            raise fail("tasks", "expected a non-empty list")
        tasks = []
        for i, raw in enumerate(raw_tasks):
            key = f"tasks[{i}]"
            if not isinstance(raw, dict) or set(raw) != {"id", "classes", "cities"}:
                raise fail(key, "expected a mapping with keys id, classes, cities")
            for name in raw["classes"]:
                try:
                    label = labels.by_name(name)
                except KeyError as exc:
                    raise fail(f"{key}.classes", str(exc.args[0])) from None
                if label.trainId in (-1, 255):
                    raise fail(f"{key}.classes", f"{name!r} is not an evaluated Cityscapes class")
            if not raw["classes"]:
                raise fail(f"{key}.classes", "a task needs at least one class")
            tasks.append(Task(int(raw["id"]), tuple(raw["classes"]), tuple(raw["cities"] or ())))
        ids = [t.id for t in tasks]
        if ids != list(range(1, len(tasks) + 1)):
            raise fail("tasks", f"task ids must be 1..{len(tasks)} in order, got {ids}")
        all_classes = [c for t in tasks for c in t.classes]
        dupes = sorted({c for c in all_classes if all_classes.count(c) > 1})
        if dupes:
            raise fail("tasks", f"class(es) in more than one task: {dupes}")
        all_cities = [c for t in tasks for c in t.cities]
        heldout = _city_set(data.get("heldout", {"split": "train", "cities": []}), "heldout", fail)
        val = _city_set(data.get("val"), "val", fail)
        shared = sorted({c for c in all_cities if all_cities.count(c) > 1})
        if shared:
            raise fail("tasks", f"city sets of tasks must be disjoint, shared: {shared}")
        leaked = sorted(set(all_cities) & set(heldout.cities))
        if leaked:
            raise fail("heldout", f"held-out cities also in a task: {leaked}")
        sets = {}
        for set_name, members in (data.get("eval_task_sets") or {}).items():
            members = tuple(int(m) for m in members)
            if not members or any(m not in ids for m in members):
                raise fail(f"eval_task_sets.{set_name}", f"unknown task id in {list(members)}")
            sets[str(set_name)] = members
        return cls(
            str(data.get("name", Path(source).stem)), tuple(tasks), heldout, val, sets, source
        )

    def to_dict(self) -> dict[str, Any]:
        """The YAML mapping of this protocol (stored in manifests and checkpoints)."""
        return {
            "name": self.name,
            "tasks": [
                {"id": t.id, "classes": list(t.classes), "cities": list(t.cities)}
                for t in self.tasks
            ],
            "heldout": {"split": self.heldout.split, "cities": list(self.heldout.cities)},
            "val": {"split": self.val.split, "cities": list(self.val.cities)},
            "eval_task_sets": {k: list(v) for k, v in self.eval_task_sets.items()},
        }

    # ----------------------------------------------------------------- channels
    @property
    def class_names(self) -> list[str]:
        """All class names in channel order."""
        return [c for t in self.tasks for c in t.classes]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def task(self, task_id: int) -> Task:
        if not 1 <= task_id <= len(self.tasks):
            raise KeyError(f"protocol {self.name!r} has tasks 1..{len(self.tasks)}, not {task_id}")
        return self.tasks[task_id - 1]

    def classes_up_to(self, stage: int) -> int:
        """Number of output channels of a model after stage ``stage`` (tasks 1..stage)."""
        return sum(len(self.task(k).classes) for k in range(1, stage + 1))

    def covered_task_sets(self, num_classes: int) -> list[str]:
        """The evaluation task sets a model with ``num_classes`` output channels can score."""
        return [
            name
            for name, tasks in self.eval_task_sets.items()
            if self.classes_up_to(max(tasks)) <= num_classes
        ]

    def task_channels(self, task_id: int) -> list[int]:
        """Channel indices of one task's classes."""
        start = self.classes_up_to(task_id - 1)
        return list(range(start, start + len(self.task(task_id).classes)))

    def task_set(self, name_or_tasks: str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
        """Tasks of an evaluation set, given by name (``"12"``) or as task ids."""
        if isinstance(name_or_tasks, str):
            if name_or_tasks in self.eval_task_sets:
                return self.eval_task_sets[name_or_tasks]
            if name_or_tasks.isdigit() and all(
                1 <= int(ch) <= len(self.tasks) for ch in name_or_tasks
            ):
                return tuple(sorted({int(ch) for ch in name_or_tasks}))
            raise KeyError(
                f"unknown task set {name_or_tasks!r}; protocol {self.name!r} defines "
                f"{sorted(self.eval_task_sets)}"
            )
        return tuple(sorted(set(name_or_tasks)))

    def set_channels(self, task_set: str | tuple[int, ...] | list[int]) -> list[int]:
        """Channel indices of a task set, in channel order."""
        return [ch for t in self.task_set(task_set) for ch in self.task_channels(t)]

    # ----------------------------------------------------------------- cities
    def train_cities(self, task_ids: tuple[int, ...] | list[int] | None = None) -> list[str]:
        """Train cities of the given tasks (all tasks when None)."""
        ids = task_ids or [t.id for t in self.tasks]
        return [c for k in ids for c in self.task(k).cities]

    def city_sets(self) -> dict[str, CitySet]:
        """Named city sets that the packer writes: ``task1``…, ``heldout``, ``val``."""
        sets = {f"task{t.id}": CitySet("train", t.cities) for t in self.tasks}
        if self.heldout.cities:
            sets["heldout"] = self.heldout
        sets["val"] = self.val
        return sets

    # ----------------------------------------------------------------- look-up tables
    def _lut(self, channel_of_class: dict[str, int]) -> np.ndarray:
        lut = np.full(256, IGNORE, dtype=np.uint8)
        for name, channel in channel_of_class.items():
            lut[labels.by_name(name).id] = channel
        return lut

    def stage_lut(self, stage: int) -> np.ndarray:
        """labelId -> global channel for task ``stage``'s classes; everything else 255."""
        offset = self.classes_up_to(stage - 1)
        return self._lut({c: offset + i for i, c in enumerate(self.task(stage).classes)})

    def joint_lut(self, up_to_stage: int | None = None) -> np.ndarray:
        """labelId -> channel for all classes of tasks 1..up_to_stage (default: all)."""
        names = self.class_names[: self.classes_up_to(up_to_stage or len(self.tasks))]
        return self._lut({c: i for i, c in enumerate(names)})

    def eval_lut(self, task_set: str | tuple[int, ...] | list[int]) -> np.ndarray:
        """labelId -> index within the task set's channel list; everything else 255."""
        names = [self.class_names[ch] for ch in self.set_channels(task_set)]
        return self._lut({c: i for i, c in enumerate(names)})


def _city_set(raw: Any, key: str, fail) -> CitySet:
    if not isinstance(raw, dict) or "cities" not in raw:
        raise fail(key, "expected a mapping with keys split, cities")
    split = str(raw.get("split", "train"))
    if split not in ("train", "val", "test"):
        raise fail(f"{key}.split", f"must be train, val or test, got {split!r}")
    return CitySet(split, tuple(raw["cities"] or ()))
