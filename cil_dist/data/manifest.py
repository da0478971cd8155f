"""``manifest.json``: what a shard folder holds, written by the packer, read by the trainer.

Layout (``version`` 1)::

    {"format": "cil-dist-shards", "version": 1,
     "resolution": [1024, 512], "image_format": "png", "source": "/data/cityscapes",
     "created": "...", "tool": "cil-dist 0.1.0",
     "task_config": {...the task protocol the shards were made for...},
     "splits": {"task1": {"split": "train", "cities": [...], "label_size": [1024, 512],
                           "shards": [{"file": "task1/task1-000000.tar", "samples": 32,
                                       "bytes": 123, "sha256": "...", "recipe": "..."}],
                           "samples": 32, "bytes": 123}, ...},
     "totals": {"shards": 7, "samples": 224, "bytes": 123456}}

Shard ``file`` entries are relative to the manifest's folder, so a shard folder can be moved
or uploaded as a whole (``s3://``, ``gs://``, ``https://``: see :mod:`cil_dist.storage`).
``source`` is stored without credentials or query strings. ``resolution`` is the stored image
size; a split's ``label_size`` the stored label size (the source resolution for ``val`` by
default, see :mod:`shards.pack`); a manifest without it means labels at ``resolution``.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from cil_dist import __version__, storage, urls

FORMAT = "cil-dist-shards"
VERSION = 1


class ManifestError(ValueError):
    """A manifest is unreadable or inconsistent; the message names the manifest and key."""


def _size(value: Any, where: str) -> tuple[int, int]:
    """``[w, h]`` as a pair of positive ints; ManifestError naming ``where`` otherwise."""
    try:
        width, height = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ManifestError(f"{where}: expected [width, height], got {value!r}") from None
    if width <= 0 or height <= 0:
        raise ManifestError(f"{where}: expected a positive size, got {value!r}")
    return width, height


@dataclass(frozen=True)
class ShardRecord:
    file: str
    samples: int
    bytes: int
    sha256: str
    recipe: str = ""  # digest of what went into the shard; lets a re-pack skip it


@dataclass
class SplitRecord:
    split: str
    cities: list[str]
    shards: list[ShardRecord] = field(default_factory=list)
    label_size: tuple[int, int] | None = None  # stored label (w, h); None: the resolution

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


@dataclass(frozen=True)
class ShardRef:
    """A shard ready to read: absolute URL plus what the manifest promises about it."""

    url: str
    samples: int
    sha256: str | None = None
    bytes: int | None = None


@dataclass
class Manifest:
    resolution: tuple[int, int]
    image_format: str
    source: str
    task_config: dict[str, Any]
    splits: dict[str, SplitRecord] = field(default_factory=dict)
    created: str = ""
    tool: str = f"cil-dist {__version__}"
    url: str = ""  # where it was loaded from (not stored)

    # ----------------------------------------------------------------- io
    def to_dict(self) -> dict[str, Any]:
        splits = {
            name: {
                "split": rec.split,
                "cities": list(rec.cities),
                "label_size": list(self.label_size(name)),
                "shards": [asdict(s) for s in rec.shards],
                "samples": rec.samples,
                "bytes": rec.bytes,
            }
            for name, rec in self.splits.items()
        }
        return {
            "format": FORMAT,
            "version": VERSION,
            "resolution": list(self.resolution),
            "image_format": self.image_format,
            "source": urls.redact_url(self.source),
            "created": self.created or _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "tool": self.tool,
            "task_config": self.task_config,
            "splits": splits,
            "totals": {
                "shards": sum(len(r.shards) for r in self.splits.values()),
                "samples": sum(r.samples for r in self.splits.values()),
                "bytes": sum(r.bytes for r in self.splits.values()),
            },
        }

    def save(self, url: str, options: storage.StorageOptions | None = None) -> None:
        """Write atomically (local) or as one object (object storage)."""
        payload = json.dumps(self.to_dict(), indent=1).encode()
        with storage.open_for_write(url, options=options) as stream:
            stream.write(payload)

    @classmethod
    def load(cls, url: str, options: storage.StorageOptions | None = None) -> Manifest:
        """Read and validate a manifest from a path or URL (``options``: how object stores are
        reached; None: the defaults)."""
        shown = urls.redact_url(url)
        try:
            raw = json.loads(storage.read_bytes(url, options))
        except FileNotFoundError:
            raise ManifestError(f"{shown}: manifest not found") from None
        except ImportError as exc:
            raise ManifestError(str(exc)) from None
        except Exception as exc:  # OSError, bad JSON, or a transport library's own errors
            reason = urls.redact_url(f"{type(exc).__name__}: {exc}")
            # from None: the transport's own error may hold the URL with its credentials
            raise ManifestError(f"{shown}: cannot read manifest: {reason}") from None
        return cls.from_dict(raw, url)

    @classmethod
    def from_dict(cls, raw: Any, url: str = "<dict>") -> Manifest:
        shown = urls.redact_url(url)

        def need(mapping: dict, key: str, where: str) -> Any:
            if not isinstance(mapping, dict) or key not in mapping:
                raise ManifestError(f"{shown}: missing key {where}{key!r}")
            return mapping[key]

        if need(raw, "format", "") != FORMAT:
            raise ManifestError(f"{shown}: 'format' is {raw.get('format')!r}, expected {FORMAT!r}")
        if need(raw, "version", "") != VERSION:
            raise ManifestError(f"{shown}: unsupported manifest version {raw['version']!r}")
        splits = {}
        for name, rec in need(raw, "splits", "").items():
            shards = []
            for i, s in enumerate(need(rec, "shards", f"splits.{name}.")):
                where = f"splits.{name}.shards[{i}]."
                shards.append(
                    ShardRecord(
                        file=str(need(s, "file", where)),
                        samples=int(need(s, "samples", where)),
                        bytes=int(need(s, "bytes", where)),
                        sha256=str(need(s, "sha256", where)),
                        recipe=str(s.get("recipe", "")),
                    )
                )
            label_size = rec.get("label_size")
            splits[name] = SplitRecord(
                str(rec.get("split", "train")),
                list(rec.get("cities", [])),
                shards,
                _size(label_size, f"{shown}: splits.{name}.label_size") if label_size else None,
            )
        width, height = need(raw, "resolution", "")
        return cls(
            resolution=(int(width), int(height)),
            image_format=str(need(raw, "image_format", "")),
            source=str(raw.get("source", "")),
            task_config=dict(raw.get("task_config") or {}),
            splits=splits,
            created=str(raw.get("created", "")),
            tool=str(raw.get("tool", "")),
            url=url,
        )

    # ----------------------------------------------------------------- queries
    def label_size(self, split_name: str) -> tuple[int, int]:
        """The stored label size (w, h) of a split."""
        return tuple(self.splits[split_name].label_size or self.resolution)

    def shard_refs(self, split_names: list[str] | tuple[str, ...] | str) -> list[ShardRef]:
        """Absolute shard references of one or more splits (e.g. ``["task1", "task2"]``)."""
        names = [split_names] if isinstance(split_names, str) else list(split_names)
        missing = [n for n in names if n not in self.splits]
        if missing:
            where = urls.redact_url(self.url) or "manifest"
            raise ManifestError(f"{where}: no split(s) {missing}; it has {sorted(self.splits)}")
        base = urls.parent(self.url) if self.url else ""
        refs = []
        for name in names:
            for shard in self.splits[name].shards:
                refs.append(
                    ShardRef(urls.join(base, shard.file), shard.samples, shard.sha256, shard.bytes)
                )
        return refs

    def samples(self, split_names: list[str] | tuple[str, ...] | str) -> int:
        return sum(ref.samples for ref in self.shard_refs(split_names))
