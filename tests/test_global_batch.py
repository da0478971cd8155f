"""The global batch: per-rank batch from data.global_batch_size, losses normalised over the
pixels of all ranks, BatchNorm over all ranks' samples and dropout masks drawn over the global
batch, so that 2 gloo ranks × 3 images take the same optimiser step as 1 rank × 6 (real
processes, real DDP)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from cil_dist.config import ConfigError, DataConfig
from cil_dist.model import ERFNet
from cil_dist.model.global_dropout import set_dropout_draws
from cil_dist.model.sync_batchnorm import GlobalBatchNorm2d, convert_sync_batchnorm
from cil_dist.training.losses import PixelCounts, global_pixel_counts, incremental_loss
from tests.helpers import run_ranks

BATCH, OLD, CLASSES = 6, 5, 11
DROPOUT_SEED = 7


def test_per_rank_batch_is_the_global_batch_divided_by_the_ranks():
    cfg = DataConfig(manifest="m.json", batch_size=4, global_batch_size=6)
    assert [cfg.rank_batch_size(w) for w in (1, 2, 3, 6)] == [6, 3, 2, 1]
    with pytest.raises(ConfigError, match=r"data\.global_batch_size: 6 does not divide among 4"):
        cfg.rank_batch_size(4)
    assert DataConfig(manifest="m.json", batch_size=4).rank_batch_size(3) == 4


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed batch whose two halves hold very different numbers of labelled pixels."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, 32, 64, generator=gen, dtype=torch.float64)
    labels = torch.randint(OLD, CLASSES, (BATCH, 32, 64), generator=gen)
    keep = torch.rand(BATCH, 32, 64, generator=gen)
    keep[: BATCH // 2] *= 0.2  # first half: mostly unlabelled; second half: mostly labelled
    labels[keep < 0.5] = 255
    teacher = torch.randn(BATCH, OLD, 32, 64, generator=gen, dtype=torch.float64)
    return images, labels, teacher


def student() -> ERFNet:
    """In float64: ERFNet's gradients at initialisation differ by ~3% between float32 and
    float64 on the same process, which would hide any error of the distributed step."""
    torch.manual_seed(0)
    return ERFNet(CLASSES).double().train()  # dropout on: its masks follow the global batch


def step_gradients(model: torch.nn.Module, images, labels, teacher, counts) -> torch.Tensor:
    total, _, _ = incremental_loss(model(images), teacher, labels, OLD, counts=counts)
    total.backward()
    return total.detach()


def flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def running_stats(model: torch.nn.Module) -> torch.Tensor:
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    return torch.cat([torch.cat([m.running_mean, m.running_var]) for m in bns])


def _rank(rank: int, out: str, sync_bn: bool, global_counts: bool) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    images, labels, teacher = (t.chunk(world)[rank] for t in inputs())
    model = student()
    if sync_bn:
        model = convert_sync_batchnorm(model, "cpu")
    ddp = DistributedDataParallel(model)
    set_dropout_draws(model, DROPOUT_SEED, BATCH, rank * BATCH // world)
    counts = global_pixel_counts(labels, world) if global_counts else None
    loss = step_gradients(ddp, images, labels, teacher, counts)
    losses = [torch.zeros((), dtype=loss.dtype) for _ in range(world)]
    dist.all_gather(losses, loss)
    if rank == 0:
        torch.save(
            {
                "loss": torch.stack(losses).mean(),
                "grads": flat_grads(model),
                "stats": running_stats(model),
            },
            out,
        )
    dist.barrier()  # neither rank tears gloo down while the other still uses it
    dist.destroy_process_group()


def two_rank_step(tmp_path: Path, sync_bn: bool, global_counts: bool) -> dict:
    out = tmp_path / f"rank0_{sync_bn}_{global_counts}.pt"
    run_ranks(_rank, 2, str(out), sync_bn, global_counts)
    return torch.load(out, weights_only=True)


@pytest.mark.slow
def test_two_ranks_of_three_take_the_step_of_one_rank_of_six(tmp_path):
    images, labels, teacher = inputs()
    model = student()
    set_dropout_draws(model, DROPOUT_SEED, BATCH, 0)
    loss = step_gradients(model, images, labels, teacher, PixelCounts.of(labels))
    reference = {"loss": loss, "grads": flat_grads(model), "stats": running_stats(model)}

    both = two_rank_step(tmp_path, sync_bn=True, global_counts=True)
    torch.testing.assert_close(both["loss"], reference["loss"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(both["grads"], reference["grads"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(both["stats"], reference["stats"], rtol=1e-9, atol=1e-12)

    # each half alone is not the batch: per-rank means or per-rank BN give another step
    local_means = two_rank_step(tmp_path, sync_bn=True, global_counts=False)
    assert not torch.allclose(local_means["grads"], reference["grads"], rtol=1e-2, atol=1e-4)
    local_bn = two_rank_step(tmp_path, sync_bn=False, global_counts=True)
    assert not torch.allclose(local_bn["grads"], reference["grads"], rtol=1e-2, atol=1e-4)


def test_global_batchnorm_without_a_process_group_is_batchnorm():
    torch.manual_seed(0)
    plain = torch.nn.BatchNorm2d(4, eps=1e-3)
    converted = convert_sync_batchnorm(torch.nn.Sequential(plain), "cpu")[0]
    assert isinstance(converted, GlobalBatchNorm2d)
    x = torch.randn(3, 4, 5, 6)  # float32 path
    torch.testing.assert_close(converted(x), torch.nn.BatchNorm2d(4, eps=1e-3)(x))


def test_fewer_samples_than_one_step_names_the_batch_key_in_use():
    assert DataConfig(manifest="m.json", batch_size=4).batches_per_epoch(17, 2) == 2
    with pytest.raises(ConfigError, match=r"^data\.batch_size: 7 training samples, fewer than 2"):
        DataConfig(manifest="m.json", batch_size=4).batches_per_epoch(7, 2)
    cfg = DataConfig(manifest="m.json", batch_size=1, global_batch_size=6)
    assert cfg.batches_per_epoch(12, 3) == 2
    with pytest.raises(ConfigError, match=r"^data\.global_batch_size: 5 training samples, fewer"):
        cfg.batches_per_epoch(5, 3)
