"""One training stage: student (DDP, mixed precision), optional frozen teacher, checkpoints.

``run_training(cfg)`` is the entry point for a plain process, ``torchrun`` and submitit jobs:
it reads rank/world from the environment, builds everything from the config, resumes from the
latest checkpoint of the run folder, trains the remaining epochs and evaluates at the end.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cil_dist.accel import require_apex
from cil_dist.config import ConfigError, TrainConfig
from cil_dist.data.cached_loader import CachedLoader, build_cached_loader
from cil_dist.data.global_order import rank_part
from cil_dist.data.pipeline import EpochLoader, ShardSource, build_train_loader
from cil_dist.data.shardlist import derive_seed
from cil_dist.distributed import DistEnv, all_reduce_sum, barrier, process_group
from cil_dist.logs import setup_logging
from cil_dist.model import ERFNet, build_model
from cil_dist.model.global_dropout import set_dropout_draws
from cil_dist.model.sync_batchnorm import convert_sync_batchnorm
from cil_dist.protocol import TaskProtocol
from cil_dist.storage import StorageOptions
from cil_dist.training import checkpoint as ckpt
from cil_dist.training import config_diff, run_folder
from cil_dist.training.losses import (
    cross_entropy,
    finetune_loss,
    global_pixel_counts,
    incremental_loss,
)
from cil_dist.training.optim import build_optimizer, poly_schedule
from cil_dist.training.precision import Precision, build_precision
from cil_dist.training.stage import StagePlan, plan_run
from cil_dist.training.teacher import (
    init_from_previous,
    load_previous_state,
    load_teacher,
    teacher_forward,
)
from cil_dist.training.validation import MetricsLog, Validator, distill_metrics, distill_sums
from cil_dist.urls import redact_url

log = logging.getLogger(__name__)


@dataclass
class Components:
    """Everything a training epoch needs, built once."""

    plan: StagePlan
    student: torch.nn.Module  # DDP-wrapped when distributed
    bare_student: ERFNet  # for saving (no `module.` prefix)
    teacher: ERFNet | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: Precision
    loader: EpochLoader | CachedLoader
    state: ckpt.TrainState


def stage_loss(plan: StagePlan, cfg: TrainConfig, logits, teacher_logits, labels, counts=None):
    """``(total, ce, kd)`` of the stage's method; ``counts`` normalise over the global batch."""
    if plan.uses_teacher:
        return incremental_loss(
            logits,
            teacher_logits,
            labels,
            plan.num_old_classes,
            temperature=cfg.teacher.temperature,
            lambda_gs=cfg.teacher.lambda_gs,
            counts=counts,
        )
    if plan.method == "finetune" and plan.num_old_classes:
        ce = finetune_loss(logits, labels, plan.num_old_classes, counts)
    else:
        ce = cross_entropy(logits, labels, counts)
    return ce, ce, torch.zeros((), device=ce.device)


def train_step(parts: Components, cfg: TrainConfig, batch: dict, env: DistEnv) -> torch.Tensor:
    """One optimiser step; returns the detached figures ``[total, ce, kd]`` plus, with a
    teacher, the distillation diagnostic sums (:func:`~cil_dist.training.validation.distill_sums`).
    """
    memory = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    images, labels = parts.loader.to_device(batch, env.device, memory)
    parts.optimizer.zero_grad(set_to_none=True)
    # dropout masks of the whole global batch from one seed per (seed, epoch, step), this rank
    # keeping its slice: the same masks per sample at any world size and after any resume
    global_batch = images.shape[0] * env.world_size
    part = rank_part(global_batch, env.rank, env.world_size)
    seed = derive_seed("dropout", cfg.seed, parts.state.epoch, parts.state.epoch_step)
    set_dropout_draws(parts.bare_student, seed, global_batch, part.start)
    teacher_logits = (
        teacher_forward(parts.teacher, images, parts.precision) if parts.teacher else None
    )
    with parts.precision.autocast():
        logits = parts.student(images)
    # per-rank sums over the global batch's pixel counts: DDP's gradient average is then the
    # gradient of the whole batch's loss, whatever the number of ranks
    counts = global_pixel_counts(labels, env.world_size)
    total, ce, kd = stage_loss(parts.plan, cfg, logits, teacher_logits, labels, counts)
    if not torch.isfinite(total):
        raise FloatingPointError(
            f"non-finite loss at epoch {parts.state.epoch + 1}, step {parts.state.step + 1}: "
            f"ce {ce.item()}, kd {kd.item()}; stopping (last checkpoint intact)"
        )
    parts.precision.backward_step(total, parts.optimizer)
    figures = torch.stack([total.detach(), ce.detach(), kd.detach()]).double()
    if teacher_logits is not None:
        figures = torch.cat([figures, distill_sums(logits, teacher_logits, labels)])
    return figures


def train_one_epoch(
    parts: Components,
    cfg: TrainConfig,
    env: DistEnv,
    log_to: MetricsLog | None = None,
    on_step: Callable[[], None] | None = None,
) -> dict:
    """Train (the rest of) one epoch; returns loss parts averaged over all ranks, the throughput
    and, in an incremental stage, the distillation diagnostic. ``on_step`` runs after every
    step but the epoch's last (mid-epoch checkpoints)."""
    parts.student.train()
    state = parts.state
    parts.loader.set_epoch(state.epoch, state.epoch_step)  # mid-epoch: resume at that step
    sums = None  # [total, ce, kd] (+ the distillation sums with a teacher), summed over steps
    start, images = time.perf_counter(), 0
    lr = parts.optimizer.param_groups[0]["lr"]
    # the bar closes however the epoch ends, so a data error's one line is not glued to it
    steps = len(parts.loader) - state.epoch_step
    with tqdm(
        total=steps,
        desc=f"epoch {state.epoch + 1}/{cfg.optim.epochs}",
        disable=not env.is_main,
        leave=False,
        file=sys.stderr,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
    ) as bar:
        for batch in parts.loader:
            figures = train_step(parts, cfg, batch, env).cpu()
            sums = figures if sums is None else sums + figures
            images += batch["image"].shape[0]
            state.step += 1
            state.epoch_step += 1
            state.samples += batch["image"].shape[0] * env.world_size  # equal batches per rank
            bar.update(1)
            if on_step is not None and state.epoch_step < len(parts.loader):
                on_step()
            if env.is_main and parts.state.step % cfg.log_every == 0:
                rate = images * env.world_size / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{figures[0]:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
                if log_to is not None:
                    for name, value in zip(("total", "ce", "kd"), figures.tolist(), strict=False):
                        log_to.scalar(f"loss/{name}", value, parts.state.step)
    state.epoch_step = 0
    *figures, images = all_reduce_sum([*sums.tolist(), float(images)], env)
    seconds = time.perf_counter() - start
    skipped_shards, skipped_samples = parts.loader.skipped.totals(env)  # each shard once
    # rank r's loss is W · (its pixel sum) / (global pixels): the batch's loss is the ranks' mean
    per_step = steps * env.world_size
    stats = {
        "loss": figures[0] / per_step,
        "ce": figures[1] / per_step,
        "kd": figures[2] / per_step,
        "lr": lr,
        "images_per_s": images / seconds,
        "skipped_shards": int(skipped_shards),  # on_shard_error=skip, all ranks
        "skipped_samples": int(skipped_samples),
    }
    if len(figures) > 3:
        stats |= distill_metrics(torch.tensor(figures[3:]))
    return stats


def build_student(cfg: TrainConfig, plan: StagePlan, env: DistEnv) -> ERFNet:
    torch.manual_seed(cfg.seed)
    student = build_model(plan.num_classes, encoder_init=cfg.model.encoder_init or None)
    if plan.method == "finetune" and plan.uses_previous:
        options = StorageOptions.from_data_config(cfg.data)
        previous = load_previous_state(
            cfg.teacher.checkpoint, plan.num_old_classes, options, stage=plan.stage
        )
        init_from_previous(student, previous, plan.num_old_classes)
    if cfg.model.sync_batchnorm and env.distributed:
        if cfg.model.apex:
            student = require_apex("model.apex").parallel.convert_syncbn_model(student)
        else:  # torch's SyncBatchNorm on CUDA, the same statistics on CPU ranks (gloo)
            student = convert_sync_batchnorm(student, env.device.split(":")[0])
    elif cfg.model.apex:
        require_apex("model.apex")
    memory = torch.channels_last if cfg.model.channels_last else torch.preserve_format
    return student.to(env.device, memory_format=memory)


def check_manifest_protocol(source: ShardSource, cfg: TrainConfig, protocol: TaskProtocol):
    """The shards must have been packed for the same city sets as the run's protocol."""
    if not cfg.data.manifest:
        return
    from cil_dist.data.manifest import Manifest

    manifest = Manifest.load(cfg.data.manifest, StorageOptions.from_data_config(cfg.data))
    for name, city_set in protocol.city_sets().items():
        if name in manifest.splits and list(manifest.splits[name].cities) != list(city_set.cities):
            raise ConfigError(
                f"data.manifest: {redact_url(cfg.data.manifest)} split {name!r} holds cities "
                f"{manifest.splits[name].cities}, protocol {protocol.name!r} wants "
                f"{list(city_set.cities)}; re-pack with --tasks {protocol.source}"
            )


def run_dir_of(cfg: TrainConfig) -> Path:
    return Path(cfg.out_dir) / cfg.name


def build(cfg: TrainConfig, env: DistEnv) -> Components:
    """Validate the config and build model, teacher, data, optimiser and precision."""
    plan = plan_run(cfg)
    protocol = plan.protocol
    source = ShardSource.from_config(cfg.data, plan.splits)
    check_manifest_protocol(source, cfg, protocol)
    teacher = None
    if plan.uses_teacher:
        teacher = load_teacher(
            cfg.teacher.checkpoint,
            plan.num_old_classes,
            env.device,
            cfg.model.channels_last,
            StorageOptions.from_data_config(cfg.data),
            stage=plan.stage,
        )
    precision = build_precision(cfg.precision, env)
    bare = build_student(cfg, plan, env)
    student = bare
    if env.distributed:
        student = DistributedDataParallel(
            bare, device_ids=[env.local_rank] if env.device.startswith("cuda") else None
        )
    optimizer = build_optimizer(bare.parameters(), cfg.optim)
    if cfg.data.cache == "none":
        loader = build_train_loader(cfg.data, source, plan.lut, env, seed=cfg.seed)
    else:  # decoded once per node; world-size-independent global batches
        loader = build_cached_loader(cfg.data, source, plan.lut, env, seed=cfg.seed)
    return Components(
        plan,
        student,
        bare,
        teacher,
        optimizer,
        poly_schedule(optimizer, cfg.optim),
        precision,
        loader,
        ckpt.TrainState(),
    )


def public_config(cfg: TrainConfig) -> dict:
    """The config as written to ``config.yaml`` and checkpoints: URLs without secrets."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg))
    data = container["data"]
    data["manifest"] = redact_url(data["manifest"])
    data["shards"] = [redact_url(url) for url in data["shards"]]
    data["endpoint_url"] = redact_url(data["endpoint_url"])
    container["teacher"]["checkpoint"] = redact_url(container["teacher"]["checkpoint"])
    return container


def checkpoint_payload(parts: Components, cfg: TrainConfig) -> dict:
    return {
        "model": parts.bare_student.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.precision.scaler.state_dict() if parts.precision.scaler else {},
        "state": ckpt.state_to_dict(parts.state),
        "sampler": parts.loader.sampler_state(),
        "rng": ckpt.rng_state(),
        "config": public_config(cfg),
        "protocol": parts.plan.protocol.to_dict(),
        "num_classes": parts.plan.num_classes,
        "method": parts.plan.method,
        "stage": parts.plan.stage,
    }


def newest_loadable(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint of the run that loads; an unreadable newer one (a truncated file)
    is passed over with a warning naming both."""
    skipped: list[str] = []
    for path in run_folder.resume_candidates(run_dir):
        try:
            payload = ckpt.load_checkpoint(path)
        except ckpt.CheckpointError as exc:
            skipped.append(str(exc))
            continue
        for reason in skipped:
            log.warning("%s; resuming from %s instead", reason, path)
        return path, payload
    if skipped:
        raise ckpt.CheckpointError(
            f"{run_dir}: no checkpoint loads ({'; '.join(skipped)}); move them away to restart"
        )
    return None


def resume(parts: Components, cfg: TrainConfig, run_dir: Path) -> None:
    """Restore everything from the run's latest checkpoint (``checkpoint.resume``)."""
    mode = cfg.checkpoint.resume
    if mode == "none":
        return
    if mode == "auto":
        found = newest_loadable(run_dir)
        if found is None:
            return
        path, payload = found
    else:
        options = StorageOptions.from_data_config(cfg.data)
        path, payload = Path(mode), ckpt.load_checkpoint(mode, options=options)
    if payload.get("format") != ckpt.FORMAT:
        raise ckpt.CheckpointError(f"{path}: a plain state dict cannot be resumed from")
    mine = (parts.plan.method, parts.plan.stage, parts.plan.num_classes)
    theirs = (payload.get("method"), payload.get("stage"), payload.get("num_classes"))
    if mine != theirs:
        raise ckpt.CheckpointError(
            f"{path}: checkpoint is (method, stage, classes) = {theirs}, this run is {mine}"
        )
    changes = check_config_change(cfg, payload, path)
    parts.state = ckpt.restore(
        payload, parts.bare_student, parts.optimizer, parts.scheduler, parts.precision.scaler
    )
    if changes:
        apply_optim_config(parts, cfg)
    check_sampler(parts, cfg, payload, path)
    log.info("resumed from %s at epoch %d, step %d", path, parts.state.epoch, parts.state.step)


def check_config_change(cfg: TrainConfig, payload: dict, path: Path) -> dict:
    """The keys that alter the run and differ from the checkpoint's config: an error, or with
    ``checkpoint.allow_config_change`` a warning naming them (this config's values are used)."""
    changes = config_diff.config_changes(payload.get("config") or {}, public_config(cfg))
    if not changes:
        return changes
    described = config_diff.describe_changes(changes)
    if not cfg.checkpoint.allow_config_change:
        raise ConfigError(
            f"{path}: this config changes {described} against the checkpoint's; "
            "set checkpoint.allow_config_change=true to resume with the new values, "
            "or give the run another name"
        )
    ignored = " (no effect: the weights come from the checkpoint)"
    log.warning(
        "checkpoint.allow_config_change: resuming %s with %s; this config is used from here "
        "on (data, model settings, optimiser lr and weight decay on the new schedule), the "
        "weights, optimiser moments, progress and RNG states are the checkpoint's%s",
        path,
        described,
        ignored if "model.encoder_init" in changes else "",
    )
    return changes


def check_sampler(parts: Components, cfg: TrainConfig, payload: dict, path: Path) -> None:
    """A mid-epoch resume continues the checkpoint's sample order only if that order is this
    run's: the same shards (or cache) and batches; else an error, or with
    ``checkpoint.allow_config_change`` a warning (the epoch's order is then this run's)."""
    saved, current = payload.get("sampler"), parts.loader.sampler_state()
    if not parts.state.epoch_step or saved is None or saved == current:
        return
    message = (
        f"{path}: a mid-epoch checkpoint (epoch {parts.state.epoch + 1}, step "
        f"{parts.state.epoch_step}) of another sample order: {saved} -> {current} (the shards "
        "or the batch changed)"
    )
    if not cfg.checkpoint.allow_config_change:
        raise ConfigError(
            f"{message}; set checkpoint.allow_config_change=true to resume at that step anyway"
        )
    log.warning("%s; resuming at that step in this run's order", message)


def apply_optim_config(parts: Components, cfg: TrainConfig) -> None:
    """After restoring the checkpoint's optimiser: this config's lr and weight decay, the lr on
    its poly schedule at the resumed epoch (the checkpoint restores the old base lr)."""
    scheduler = parts.scheduler
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    scheduler.base_lrs = [cfg.optim.lr] * len(parts.optimizer.param_groups)
    for group in parts.optimizer.param_groups:
        group["initial_lr"] = cfg.optim.lr
        group["lr"] = cfg.optim.lr * factor
        group["weight_decay"] = cfg.optim.weight_decay
    scheduler._last_lr = [group["lr"] for group in parts.optimizer.param_groups]


def save(
    parts: Components, cfg: TrainConfig, path: Path, env: DistEnv, complete: bool = False
) -> None:
    """Rank 0 writes the checkpoint (``complete``: the final one, every epoch trained)."""
    if env.is_main:
        ckpt.save_checkpoint(path, **checkpoint_payload(parts, cfg), complete=complete)
    barrier(env)


def log_epoch(stats: dict, cfg: TrainConfig, epoch: int) -> None:
    distill = ""
    if "distill/agreement" in stats:
        distill = (
            f"; distillation: argmax agreement {stats['distill/agreement']:.3f}, "
            f"old-class mass {stats['distill/old_mass']:.3f}"
        )
    log.info(
        "epoch %d/%d: loss %.4f (ce %.4f, kd %.4f), lr %.2e, %.1f img/s%s",
        epoch,
        cfg.optim.epochs,
        stats["loss"],
        stats["ce"],
        stats["kd"],
        stats["lr"],
        stats["images_per_s"],
        distill,
    )
    if stats["skipped_samples"] or stats["skipped_shards"]:
        log.warning(
            "epoch %d: %d samples of %d unreadable shard(s) skipped (data.on_shard_error=skip)",
            epoch,
            stats["skipped_samples"],
            stats["skipped_shards"],
        )


def log_validation(results: dict[str, dict[str, float]], epoch: int) -> None:
    for split, values in results.items():
        shown = ", ".join(
            f"{name.split('/')[0]} {100 * value:.1f}"
            for name, value in values.items()
            if name.endswith("/mIoU")
        )
        log.info("epoch %d: %s mIoU %s", epoch, split, shown)


def fit(parts: Components, cfg: TrainConfig, env: DistEnv, run_dir: Path) -> Path:
    """Train the remaining epochs; returns the final checkpoint's path."""
    final = run_folder.final_path(run_dir)
    if parts.state.epoch >= cfg.optim.epochs and final.is_file():
        log.info("run %s already finished (%s)", run_dir, final)
        return final
    metrics = MetricsLog(run_dir, env, cfg.tensorboard)
    metrics.truncate_after(parts.state.epoch)
    validator = Validator(cfg, parts.plan, env, parts.precision)
    try:
        every_steps = cfg.checkpoint.every_steps

        def mid_epoch_checkpoint() -> None:
            if every_steps and parts.state.step % every_steps == 0:
                at = run_folder.periodic_path(run_dir, parts.state.epoch, parts.state.epoch_step)
                save(parts, cfg, at, env)
                if env.is_main:
                    run_folder.prune(run_dir, cfg.checkpoint.keep)

        while parts.state.epoch < cfg.optim.epochs:
            stats = train_one_epoch(parts, cfg, env, metrics, mid_epoch_checkpoint)
            parts.scheduler.step()
            parts.state.epoch += 1
            epoch = parts.state.epoch
            log_epoch(stats, cfg, epoch)
            metrics.add(epoch, parts.state.step, "train", stats)
            if validator.due(epoch):
                results = validator(parts.bare_student)
                log_validation(results, epoch)
                for split, values in results.items():
                    metrics.add(epoch, parts.state.step, split, values)
            every = cfg.checkpoint.every_epochs
            if every and epoch % every == 0 and epoch < cfg.optim.epochs:
                save(parts, cfg, run_folder.periodic_path(run_dir, epoch), env)
                if env.is_main:
                    run_folder.prune(run_dir, cfg.checkpoint.keep)
    finally:
        metrics.close()
        validator.close()
    save(parts, cfg, final, env, complete=True)
    return final


def write_config(cfg: TrainConfig, run_dir: Path, env: DistEnv) -> None:
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(public_config(cfg)))


def train_stage(cfg: TrainConfig, env: DistEnv) -> Path:
    """Build, resume, train, evaluate; returns the final checkpoint path."""
    run_dir = run_dir_of(cfg)
    parts = build(cfg, env)
    if env.is_main:
        run_folder.remove_stale_temporaries(run_dir)
    resume(parts, cfg, run_dir)
    write_config(cfg, run_dir, env)  # only once the checkpoint fits this config
    final = fit(parts, cfg, env, run_dir)
    if cfg.eval.after_training:
        from cil_dist.evaluation.evaluate import evaluate_run

        evaluate_run(parts.bare_student, cfg, parts.plan, env, run_dir, parts.precision)
    return final


def run_training(cfg: TrainConfig) -> Path:
    """Entry point of one stage in this process (plain, torchrun or a submitit task)."""
    env = DistEnv.from_environment()
    setup_logging(env.rank)
    cfg.validate()
    with process_group(env, cfg.dist.timeout_s):
        return train_stage(cfg, env)
