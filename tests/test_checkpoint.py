"""checkpoint.py: describe without reading tensors, the complete marker, restore."""

from __future__ import annotations

import pytest
import torch

from cil_dist.config import OptimConfig
from cil_dist.model import ERFNet
from cil_dist.training import checkpoint as ckpt
from cil_dist.training.optim import build_optimizer, poly_schedule


def write(path, complete: bool, epoch: int = 3) -> ERFNet:
    model = ERFNet(5)
    optimizer = build_optimizer(model.parameters(), OptimConfig())
    scheduler = poly_schedule(optimizer, OptimConfig(epochs=10))
    ckpt.save_checkpoint(
        path,
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        scaler={},
        state={"epoch": epoch, "step": 7 * epoch, "samples": 42},
        rng=ckpt.rng_state(),
        method="cil",
        stage=1,
        num_classes=5,
        complete=complete,
    )
    return model


def test_describe_reads_what_a_checkpoint_is_and_whether_it_is_complete(tmp_path):
    write(tmp_path / "final.pt", complete=True)
    write(tmp_path / "epoch_0003.pt", complete=False)
    final, periodic = (
        ckpt.describe(tmp_path / "final.pt"),
        ckpt.describe(tmp_path / "epoch_0003.pt"),
    )
    assert (final.method, final.stage, final.epoch, final.num_classes) == ("cil", 1, 3, 5)
    assert final.complete and not periodic.complete
    (tmp_path / "bad.pt").write_bytes((tmp_path / "final.pt").read_bytes()[:5000])
    with pytest.raises(ckpt.CheckpointError, match=r"bad\.pt: cannot load checkpoint"):
        ckpt.describe(tmp_path / "bad.pt")


def test_restore_puts_back_weights_optimiser_schedule_and_progress(tmp_path):
    saved = write(tmp_path / "final.pt", complete=True, epoch=4)
    model = ERFNet(5)
    optimizer = build_optimizer(model.parameters(), OptimConfig())
    scheduler = poly_schedule(optimizer, OptimConfig(epochs=10))
    state = ckpt.restore(ckpt.load_checkpoint(tmp_path / "final.pt"), model, optimizer, scheduler)
    assert state == ckpt.TrainState(epoch=4, step=28, samples=42)
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_chain_skips_only_a_final_checkpoint_marked_complete(tmp_path):
    from launch.chain import JobSpec
    from launch.plan import output_verifies
    from tests.helpers import tiny_train_config

    train = tiny_train_config("unused", tmp_path)
    train.optim.epochs = 3
    job = JobSpec("s1", "train", train, None, [], str(tmp_path / "final.pt"), str(tmp_path))
    write(tmp_path / "final.pt", complete=False)
    assert output_verifies(job) == f"{tmp_path / 'final.pt'}: not marked complete"
    write(tmp_path / "final.pt", complete=True)
    assert output_verifies(job) == ""
