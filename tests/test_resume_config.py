"""Resuming with a changed config: refused naming the keys (config.yaml untouched), allowed
with ``checkpoint.allow_config_change`` (the new values used), free keys change silently."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cil_dist.cli import main
from cil_dist.config import TrainConfig
from cil_dist.training import checkpoint as ckpt
from cil_dist.training import config_diff, run_folder
from cil_dist.training.train import run_training
from tests.helpers import tiny_train_config


def two_epochs(manifest: str, out: Path, name: str) -> TrainConfig:
    cfg = tiny_train_config(manifest, out, name=name, method="joint")
    cfg.optim.epochs, cfg.checkpoint.keep = 2, 5
    return cfg


@pytest.fixture(scope="module")
def whole(manifest_path, tmp_path_factory) -> Path:
    """A 2-epoch run's folder (epoch_0001.pt, final.pt, config.yaml)."""
    out = tmp_path_factory.mktemp("whole")
    run_training(two_epochs(manifest_path, out, "whole"))
    return out / "whole"


def interrupted(whole: Path, manifest: str, out: Path) -> TrainConfig:
    """A run folder "crashed" after epoch 1 (its checkpoint and config.yaml), and its config."""
    run = out / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(run_folder.periodic_path(whole, 1), run / "checkpoints")
    shutil.copy(whole / "config.yaml", run / "config.yaml")
    return two_epochs(manifest, out, "run")


def epoch_lr(run: Path, epoch: int) -> float:
    with (run / "metrics.csv").open(newline="") as stream:
        rows = csv.DictReader(stream)
        return next(
            float(r["value"]) for r in rows if r["epoch"] == str(epoch) and r["name"] == "lr"
        )


def test_a_changed_lr_is_refused_in_one_line_and_config_yaml_is_kept(
    whole, manifest_path, tmp_path, capsys
):
    cfg = interrupted(whole, manifest_path, tmp_path)
    cfg.optim.lr = 1e-3
    config = tmp_path / "changed.yaml"
    config.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    before = (tmp_path / "run" / "config.yaml").read_bytes()
    capsys.readouterr()
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "optim.lr 0.0005 -> 0.001" in errors[0] and "epoch_0001.pt" in errors[0]
    assert "checkpoint.allow_config_change" in errors[0]
    assert (tmp_path / "run" / "config.yaml").read_bytes() == before
    assert not run_folder.final_path(tmp_path / "run").exists()


def test_allow_config_change_resumes_with_the_new_lr(whole, manifest_path, tmp_path, capsys):
    cfg = interrupted(whole, manifest_path, tmp_path)
    cfg.optim.lr, cfg.checkpoint.allow_config_change = 1e-3, True
    capsys.readouterr()
    run_training(cfg)
    warning = next(line for line in capsys.readouterr().err.splitlines() if "WARNING" in line)
    assert "checkpoint.allow_config_change" in warning and "optim.lr 0.0005 -> 0.001" in warning
    # epoch 2 runs at the new base lr on the poly schedule: 1e-3 · (1 − 1/2)^0.9
    assert epoch_lr(tmp_path / "run", 2) == pytest.approx(1e-3 * 0.5**0.9)
    assert epoch_lr(whole, 2) == pytest.approx(5e-4 * 0.5**0.9)
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert saved.optim.lr == 1e-3 and saved.checkpoint.allow_config_change
    assert (
        ckpt.load_checkpoint(run_folder.final_path(tmp_path / "run"))["config"]["optim"]["lr"]
        == 1e-3
    )


def test_keys_that_do_not_alter_the_run_change_silently(whole, manifest_path, tmp_path, capsys):
    cfg = interrupted(whole, manifest_path, tmp_path)
    cfg.log_every, cfg.checkpoint.keep, cfg.checkpoint.every_epochs = 5, 1, 3
    cfg.data.eval_batch_size, cfg.data.read_retries, cfg.dist.timeout_s = 2, 1, 120.0
    capsys.readouterr()
    final = run_training(cfg)
    err = capsys.readouterr().err
    assert "WARNING" not in err and "resumed from" in err
    first, second = ckpt.load_checkpoint(run_folder.final_path(whole)), ckpt.load_checkpoint(final)
    assert first["state"] == second["state"]
    for key, value in first["model"].items():  # the uninterrupted run, bit for bit
        assert torch.equal(value, second["model"][key]), key
    assert OmegaConf.load(tmp_path / "run" / "config.yaml").log_every == 5


def test_free_keys_are_chosen_and_unrecorded_keys_are_not_compared():
    saved = {"optim": {"lr": 5e-4}, "eval": {"every_epochs": 0}, "seed": 1}
    current = {"optim": {"lr": 5e-4}, "eval": {"every_epochs": 5}, "seed": 2, "dist": {"x": 1}}
    assert config_diff.config_changes(saved, current) == {"seed": (1, 2)}
    assert config_diff.is_free("data.num_workers") and not config_diff.is_free(
        "data.shuffle_buffer"
    )
