"""Typed configuration, one dataclass per area, merged from YAML and ``key=value`` overrides.

OmegaConf does the merging and type checking: an unknown key or a value of the wrong type is
rejected with the full dotted key in the message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config is invalid; the message names the file and the key at fault."""


CACHE_MODES = ("none", "memory", "disk")


@dataclass
class AugmentConfig:
    """Training augmentation of the paper (flip, down-rescale, crop, colour jitter)."""

    flip: bool = True
    scale_min: float = 1.0  # random down-rescale factor range: size / U[scale_min, scale_max]
    scale_max: float = 1.5
    crop: list[int] = field(default_factory=lambda: [640, 192])  # width, height
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.1


@dataclass
class DataConfig:
    """Where the shards are and how they become batches."""

    manifest: str = ""  # path or URL of manifest.json (preferred: sample counts and checksums)
    shards: list[str] = field(default_factory=list)  # or shard URLs / brace patterns
    samples_per_epoch: int = 0  # required with `shards` in training mode (no manifest counts)
    resize: list[int] = field(default_factory=lambda: [1024, 512])  # width, height fed to model
    batch_size: int = 6  # per rank (ignored when global_batch_size is set)
    # samples per optimiser step over all ranks: per-rank batch = global / world size (must
    # divide); 0 = data.batch_size per rank. The paper's chain sets 6, the paper's batch.
    global_batch_size: int = 0
    eval_batch_size: int = 4
    num_workers: int = 2  # DataLoader workers per rank
    shuffle_buffer: int = 64  # samples (undecoded) per worker
    verify_checksums: bool = True  # check each shard's sha256/size/count as it streams
    # object storage (README "Object storage"): credentials come from the standard AWS/Google
    # environment and files, never from here
    endpoint_url: str = ""  # S3-compatible endpoint (MinIO, Ceph…); "" = AWS_ENDPOINT_URL or AWS
    block_size: int = 8 << 20  # bytes per ranged read of an object: memory of one open shard
    read_retries: int = 5  # re-opens of a shard at its byte offset after a transfer failure
    retry_backoff: float = 1.0  # seconds before the first re-open, doubling each time
    on_shard_error: str = "fail"  # fail | skip (skip counts and logs the samples lost)
    # decoded cache of the training frames (README "Decoded cache"): none (stream every epoch)
    # | memory (a tmpfs, cache_dir or /dev/shm) | disk (cache_dir, a node-local folder);
    # with a cache, each epoch draws one global permutation: the world size does not matter
    cache: str = "none"
    cache_dir: str = ""  # node-local folder of the cache; "" = /dev/shm/cil-dist for memory
    cache_build_workers: int = 2  # processes decoding shards into the cache (first epoch)
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> None:
        def pair(name: str, value: list[Any]) -> None:
            if len(value) != 2 or min(value) <= 0:
                raise ConfigError(f"data.{name}: expected [width, height] > 0, got {list(value)}")

        pair("resize", self.resize)
        pair("augment.crop", self.augment.crop)
        if any(c > r for c, r in zip(self.augment.crop, self.resize, strict=True)):
            raise ConfigError(
                f"data.augment.crop: {list(self.augment.crop)} is larger than data.resize "
                f"{list(self.resize)}; a crop is cut from the resized (and down-rescaled) frame"
            )
        if not self.manifest and not self.shards:
            raise ConfigError("data.manifest or data.shards: one of them must be set")
        if not 1.0 <= self.augment.scale_min <= self.augment.scale_max:
            raise ConfigError(
                f"data.augment.scale_min/scale_max: need 1 <= min <= max, got "
                f"{self.augment.scale_min}, {self.augment.scale_max}"
            )
        if self.on_shard_error not in ("fail", "skip"):
            raise ConfigError(
                f"data.on_shard_error: expected fail or skip, got {self.on_shard_error!r}"
            )
        if self.read_retries < 0 or self.retry_backoff < 0 or self.block_size < 1:
            raise ConfigError("data.read_retries/retry_backoff must be >= 0, block_size >= 1")
        if self.batch_size < 1 or self.eval_batch_size < 1 or self.num_workers < 0:
            raise ConfigError("data.batch_size/eval_batch_size must be >= 1, num_workers >= 0")
        if self.global_batch_size < 0:
            raise ConfigError(f"data.global_batch_size: must be >= 0, got {self.global_batch_size}")
        self._validate_cache()

    def _validate_cache(self) -> None:
        if self.cache not in CACHE_MODES:
            raise ConfigError(
                f"data.cache: expected one of {', '.join(CACHE_MODES)}, got {self.cache!r}"
            )
        if self.cache == "none":
            return
        if self.cache == "disk" and not self.cache_dir:
            raise ConfigError(
                "data.cache_dir: data.cache=disk needs a node-local folder (a local SSD)"
            )
        if not self.manifest:
            raise ConfigError(
                f"data.cache: {self.cache} needs data.manifest (the cache is keyed by the "
                "shards' sample counts and checksums); use data.cache=none with data.shards"
            )
        if self.cache_build_workers < 1:
            raise ConfigError(
                f"data.cache_build_workers: must be >= 1, got {self.cache_build_workers}"
            )

    def rank_batch_size(self, world_size: int) -> int:
        """Samples per rank and step: ``global_batch_size / world_size``, else ``batch_size``."""
        if not self.global_batch_size:
            return self.batch_size
        if self.global_batch_size % world_size:
            raise ConfigError(
                f"data.global_batch_size: {self.global_batch_size} does not divide among "
                f"{world_size} ranks; choose a multiple of {world_size} or another world size"
            )
        return self.global_batch_size // world_size

    def batches_per_epoch(self, samples: int, world_size: int) -> int:
        """Optimiser steps per epoch: ``samples // (world_size × per-rank batch)``; fewer
        samples than one step is a :class:`ConfigError` naming the batch key in use."""
        batch = self.rank_batch_size(world_size)
        batches = samples // (world_size * batch)
        if batches < 1:
            key = "data.global_batch_size" if self.global_batch_size else "data.batch_size"
            raise ConfigError(
                f"{key}: {samples} training samples, fewer than {world_size} ranks × batch {batch}"
            )
        return batches


def load_train_config(
    config: str | None,
    overrides: list[str],
    base: dict | None = None,
    label: str = "override",
    layers: list[dict] | None = None,
) -> TrainConfig:
    """TrainConfig from a shipped name or YAML file, with a base dict under it, typed ``layers``
    (nested dicts, e.g. a chain's wiring) over it, then dotted overrides; an error in an
    override is blamed on ``label`` and the override, e.g. ``--set optim.lr=abc``."""
    import configs

    sources: list[Any] = [base] if base else []
    where = "overrides"
    if config:
        path = configs.find("train", config)
        sources.append(str(path))
        where = str(path)
    sources += layers or []
    return merge(TrainConfig, *sources, overrides=overrides, where=where, label=label)


def merge(
    schema: type,
    *sources: Any,
    overrides: list[str] | None = None,
    where: str = "config",
    label: str = "override",
):
    """Merge YAML files / dicts onto the dataclass ``schema``; apply ``key=value`` overrides.

    An error in a source names ``where``; one in an override names it (``--set k=v`` with
    ``label="--set"``). Either way one line with the dotted key.
    """
    from cil_dist.urls import redact_url  # an override may carry a URL with credentials

    merged = _guarded(where, lambda: _merge_sources(schema, sources))
    for item in overrides or []:
        shown = f"{label} {redact_url(item)}"
        merged = _guarded(shown, lambda: _override(merged, item), in_file=False)  # noqa: B023
    return _guarded(where, lambda: OmegaConf.to_object(merged))


def _override(merged: Any, item: str):
    return OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))


def _merge_sources(schema: type, sources: tuple[Any, ...]):
    merged = OmegaConf.structured(schema)
    for source in sources:
        loaded = OmegaConf.load(source) if isinstance(source, str) else OmegaConf.create(source)
        merged = OmegaConf.merge(merged, loaded)
    return merged


def _guarded(where: str, action: Callable[[], Any], in_file: bool = True) -> Any:
    """``action()``, its OmegaConf or YAML error turned into one ConfigError line naming
    ``where`` (and, ``in_file``, the YAML error's line and column)."""
    try:
        return action()
    except OmegaConfBaseException as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"{where}: {key}: {message}" if key else f"{where}: {message}") from None
    except yaml.YAMLError as exc:  # a syntax error: one line with the file's line and column
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark and in_file else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML{at}: {problem}") from None


# ---- rules of the stage wiring, shared by the trainer and the chain validation ------------
# Each returns the problem (the text after the key, which the caller names) or None, so that
# ``cil train`` and ``cil-launch`` word a mistake alike.

METHODS = ("cil", "finetune", "joint")  # the paper's method, its lower and its upper bound


def method_problem(method: str) -> str | None:
    """``stage.method`` must be one of :data:`METHODS`."""
    return None if method in METHODS else f"{method!r} is not one of {', '.join(METHODS)}"


def needs_previous(method: str, stage: int) -> bool:
    """Whether the run starts from the previous stage's model: cil (its teacher) and finetune
    (its initialisation) from stage 2 on; ``joint`` never."""
    return method != "joint" and stage > 1


def teacher_problem(method: str, stage: int, has_teacher: bool) -> str | None:
    """A teacher is required exactly where :func:`needs_previous` says so."""
    if method == "joint":
        return "the joint baseline trains without a teacher" if has_teacher else None
    if needs_previous(method, stage) and not has_teacher:
        return f"stage {stage} needs the final checkpoint of stage {stage - 1}"
    if stage == 1 and has_teacher:
        return "stage 1 has no previous stage; leave it empty"
    return None


def teacher_classes_problem(
    have: int, need: int, stage: int, teacher_method: str | None = None
) -> str | None:
    """The teacher of ``stage`` must be a stage model with the ``need`` classes of the earlier
    tasks; ``teacher_method``: the teacher's own method where known (a joint model is none)."""
    if teacher_method == "joint":
        return f"is a joint model; stage {stage} needs the model of stage {stage - 1}"
    if have != need:
        return (
            f"has {have} classes; stage {stage} needs a teacher with the {need} classes of "
            f"tasks < {stage}"
        )
    return None


@dataclass
class StageConfig:
    """What this run trains: a stage of the protocol with a method."""

    tasks: str = "cityscapes_cil"  # task protocol: shipped name or YAML path
    stage: int = 1  # 1..number of tasks (ignored by `joint`)
    method: str = "cil"  # cil (the paper) | finetune (lower bound) | joint (all classes at once)


@dataclass
class TeacherConfig:
    """The previous stage's final checkpoint: the teacher of `cil`, the start of `finetune`."""

    checkpoint: str = ""
    temperature: float = 1.0
    lambda_gs: float = 1.0  # strength of the entropy weighting of the distillation


@dataclass
class ModelConfig:
    encoder_init: str = ""  # optional ImageNet-pretrained encoder state dict
    # NHWC activations: 1.5x the bf16 step on CPU (bench/train_step.py), the layout of GPU
    # tensor cores
    channels_last: bool = True
    sync_batchnorm: bool = False
    apex: bool = False  # NVIDIA apex SyncBN/FusedAdam; an error when apex is not installed


@dataclass
class OptimConfig:
    """Adam with polynomial decay stepped once per epoch (the paper's optimisation)."""

    epochs: int = 200
    lr: float = 5e-4
    weight_decay: float = 3e-4
    poly_power: float = 0.9
    implementation: str = "auto"  # auto | fused | foreach | plain | apex

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"optim.epochs: must be >= 1, got {self.epochs}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(
                f"optim.lr must be > 0 and optim.weight_decay >= 0, got {self.lr}, "
                f"{self.weight_decay}"
            )


@dataclass
class PrecisionConfig:
    # auto: bf16 where the hardware runs it natively (CUDA with bf16, CPUs with AVX512-BF16 or
    # AMX), else fp16 with gradient scaling (CUDA) or fp32 (CPU) | bf16 | fp16 (CUDA) | fp32
    dtype: str = "auto"


@dataclass
class CheckpointConfig:
    every_epochs: int = 10
    every_steps: int = 0  # also every this many optimiser steps, mid-epoch (0 = off)
    keep: int = 2  # periodic checkpoints kept besides the final one
    resume: str = "auto"  # auto (latest in the run folder) | none | path of a checkpoint
    # resume although keys that alter the run differ from the checkpoint's (README "Training a
    # stage"); the changed keys are logged and this config's values used
    allow_config_change: bool = False


@dataclass
class DistConfig:
    """The process group of a multi-rank run."""

    # seconds a collective waits for the other ranks before the job fails (a hung or dead
    # rank); must exceed the longest legitimate wait (README "Training a stage")
    timeout_s: float = 600.0

    def validate(self) -> None:
        if not 0 < self.timeout_s < float("inf"):
            raise ConfigError(f"dist.timeout_s: must be > 0 seconds, got {self.timeout_s}")


@dataclass
class EvalConfig:
    """Evaluation at the end of training and validation curves during it."""

    task_sets: list[str] = field(default_factory=list)  # default: every set the model covers
    # validation during training: every N epochs (and after the last) on these manifest splits
    # (heldout = the paper's hyper-parameter city), per-class IoU to TensorBoard and
    # RUN/metrics.csv; 0 = off
    every_epochs: int = 0
    splits: list[str] = field(default_factory=lambda: ["heldout"])
    after_training: bool = True
    export_predictions: bool = False


@dataclass
class TrainConfig:
    """A training run of one stage; saved as ``config.yaml`` in its run folder."""

    name: str = "run"
    out_dir: str = "runs"
    seed: int = 1234
    log_every: int = 10  # steps
    tensorboard: bool = True
    stage: StageConfig = field(default_factory=StageConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def validate(self) -> None:
        """Every check that needs no file: data, optimiser and validation settings."""
        self.data.validate()
        self.optim.validate()
        self.dist.validate()
        if self.eval.every_epochs < 0:
            raise ConfigError(f"eval.every_epochs: must be >= 0, got {self.eval.every_epochs}")
        if self.checkpoint.every_steps < 0 or self.checkpoint.every_epochs < 0:
            raise ConfigError("checkpoint.every_steps/every_epochs: must be >= 0 (0 = off)")
        if self.eval.every_epochs and not self.eval.splits:
            raise ConfigError("eval.splits: validation during training needs at least one split")
