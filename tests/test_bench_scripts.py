"""The benchmark scripts run (their figures are the README's, not asserted here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, script: str = "gpu_check.py") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check runs")
def test_gpu_check_skips_with_one_line_without_a_gpu():
    result = run()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().count("\n") == 0
    assert result.stdout.startswith("gpu_check: skipped, no CUDA GPU here")


def test_gpu_check_measures_every_row_on_the_cpu_when_allowed():
    result = run(
        "--allow-cpu",
        "--crop",
        "64x32",
        "--frame",
        "128x64",
        "--steps",
        "1",
        "--frames",
        "8",
        "--epochs",
        "2",
    )
    assert result.returncode == 0, result.stderr
    for row in ("gloo: init", "step:", "h2d:", "data:", "ratio data/step=", "ratio h2d/step="):
        assert row in result.stdout, result.stdout


@pytest.mark.slow
def test_data_pipeline_benchmark_measures_folder_shards_and_cache_over_transports():
    args = [
        "--frames-per-city",
        "1",
        "--samples-per-shard",
        "1",
        "--epochs",
        "2",
        "--cache-epochs",
        "3",
    ]
    result = run(*args, "--batch-size", "2", "--transports", "local", script="data_pipeline.py")
    assert result.returncode == 0, result.stderr
    for row in (
        "folder loader (reference style):",
        "shard pipeline (webdataset):",
        "decoded cache + device augment:",
        "transport local ",
        "cache/folder=",
        "cache/shards=",
        "ratio=",
    ):
        assert row in result.stdout, result.stdout
