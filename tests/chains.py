"""Helpers for the chain tests: tiny chain YAMLs and the local SLURM cluster."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tests.helpers import tiny_train_config

CLUSTER_SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "slurm" / "local_cluster.sh"


def write_chain(folder: Path, manifest: str, stages: dict, epochs: int = 1, **extra) -> Path:
    """A chain YAML over the tiny test shards (2 ranks per job); ``extra`` adds top-level keys."""
    folder.mkdir(parents=True, exist_ok=True)
    train = folder / "tiny_train.yaml"
    cfg = tiny_train_config(manifest, folder / "unused")
    cfg.optim.epochs = epochs
    train.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    chain = {
        "name": "tiny",
        "train_config": str(train),
        "manifest": manifest,
        "resources": {"tasks_per_node": 2, "timeout_min": 20, "mem_gb": 1},
        "stages": stages,
        **extra,
    }
    path = folder / "chain.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(chain)))
    return path


def corrupt_copy(shard_dir: Path, manifest_path: str, dest: Path, prefix: str) -> str:
    """Copy the shards, flipping a byte in those under ``prefix`` (same size, bad checksum)."""
    manifest = json.loads(Path(manifest_path).read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            target = dest / shard["file"]
            target.parent.mkdir(parents=True, exist_ok=True)
            data = bytearray((shard_dir / shard["file"]).read_bytes())
            if shard["file"].startswith(prefix):
                data[600] ^= 0xFF  # found only while streaming, not by validation
            target.write_bytes(bytes(data))
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return str(dest / "manifest.json")


def final_weights(run_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    path = run_dir / "stages" / stage / "checkpoints" / "final.pt"
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def cluster(command: str, script: Path = CLUSTER_SCRIPT) -> subprocess.CompletedProcess:
    """Run ``script start|stop`` (default: the single-node cluster's)."""
    return subprocess.run(
        ["bash", str(script), command], capture_output=True, text=True, timeout=600
    )


def cluster_running(conf: str) -> bool:
    env = {**os.environ, "SLURM_CONF": conf}
    try:
        done = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, env=env)
    except FileNotFoundError:
        return False
    return done.returncode == 0 and "UP" in done.stdout
