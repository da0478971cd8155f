"""The real command-line tools: ``cil train`` under torchrun, then ``cil eval`` and ``cil infer``
on its checkpoint; misused options and files end in one line with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import free_port

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_cli_train_under_torchrun_then_eval_and_infer(manifest_path, synth_root, tmp_path):
    common = [
        f"out_dir={tmp_path}",
        f"data.manifest={manifest_path}",
        "data.resize=[128,64]",
        "data.augment.crop=[96,48]",
        "data.batch_size=2",
        "data.num_workers=1",
        "optim.epochs=2",
        "checkpoint.every_epochs=1",
    ]
    subprocess.run(
        [
            BIN / "torchrun",
            "--nnodes=1",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            "-m",
            "cil_dist.cli",
            "train",
            "--config",
            "demo_synthetic",
            "--set",
            *common,
            "name=joint",
            "stage.method=joint",
        ],
        check=True,
        timeout=600,
    )
    run = tmp_path / "joint"
    final = run / "checkpoints" / "final.pt"
    assert final.is_file() and (run / "config.yaml").is_file()
    assert (run / "tensorboard").is_dir()
    metrics = json.loads((run / "eval_val" / "metrics.json").read_text())
    assert set(metrics) == {"1", "2", "12", "3", "123"}
    assert "Task 1∪2∪3" in (run / "eval_val" / "table.md").read_text()

    export = tmp_path / "export"
    subprocess.run(
        [
            BIN / "cil",
            "eval",
            "--checkpoint",
            final,
            "--task-sets",
            "1",
            "12",
            "--out",
            tmp_path / "eval",
            "--export-predictions",
            export,
        ],
        check=True,
        timeout=300,
    )
    assert set(json.loads((tmp_path / "eval" / "metrics.json").read_text())) == {"1", "12"}
    exported = sorted(p.name for p in export.glob("*.png"))
    assert len(exported) == 6 and exported[0].endswith("_leftImg8bit.png")

    image = next((synth_root / "leftImg8bit" / "val" / "lindau").glob("*.png"))
    label = (
        synth_root
        / "gtFine"
        / "val"
        / "lindau"
        / image.name.replace("leftImg8bit.png", "gtFine_labelIds.png")
    )
    inferred = subprocess.run(
        [
            BIN / "cil",
            "infer",
            "--checkpoint",
            final,
            "--image",
            image,
            "--ground-truth",
            label,
            "--output-path",
            tmp_path / "infer",
        ],
        check=True,
        timeout=300,
        capture_output=True,
        text=True,
    )
    written = sorted(p.name for p in (tmp_path / "infer").iterdir())
    stem = image.stem
    assert written == [f"{stem}_metrics.json", f"{stem}_overlay.png", f"{stem}_segmentation.png"]
    printed = json.loads((tmp_path / "infer" / f"{stem}_metrics.json").read_text())
    row = f"| {stem} | {100 * printed['1']['miou']:.1f} |"
    assert row in inferred.stdout and "| road |" in inferred.stdout  # the metrics, on stdout


def test_config_mistakes_end_in_one_line_before_torch_is_imported(tmp_path):
    """``cil train`` checks the settings and the stage's wiring before importing torch (seconds
    on a slow node): such a mistake ends in under a second, named as training would name it."""
    cases = {
        "optim.epochz=3": "optim.epochz",
        "stage.method=distill": "stage.method: 'distill' is not one of cil, finetune, joint",
        "stage.stage=2": "teacher.checkpoint: stage 2 needs the final checkpoint of stage 1",
        "data.batch_size=0": "data.batch_size",
    }
    code = "\n".join(
        [
            "import sys",
            "from cil_dist.cli import main",
            f"for item in {list(cases)!r}:",
            "    assert main(['train', '--config', 'demo_synthetic', '--set', item]) == 2, item",
            "print('torch' in sys.modules)",
        ]
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    errors = result.stderr.strip().splitlines()
    assert len(errors) == len(cases) and "Traceback" not in result.stderr, errors
    for line, words in zip(errors, cases.values(), strict=True):
        assert words in line, (line, words)


@pytest.mark.parametrize("cli", ["cil", "cil-launch"])
def test_a_yaml_syntax_error_is_one_line_naming_the_file(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {epochs: 3\n")
    args = ["train", "--config", bad] if cli == "cil" else ["submit", bad, "--out", tmp_path]
    result = subprocess.run(
        [BIN / cli, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{bad}: not valid YAML (line 2, column 1)" in lines[0], lines


@pytest.mark.parametrize("case", ["task set", "not an image", "output is a file", "png"])
def test_misused_eval_and_infer_end_in_one_line_exit_2(case, tmp_path, manifest_path, synth_root):
    from cil_dist.model import ERFNet

    checkpoint = tmp_path / "plain.pt"
    torch.save(ERFNet(5).state_dict(), checkpoint)  # a published reference state dict
    image = next((synth_root / "leftImg8bit" / "val" / "lindau").glob("*.png"))
    (tmp_path / "file").write_text("")
    args, expected = {
        "task set": (
            ["eval", "--checkpoint", checkpoint, "--task-sets", "7", "--manifest", manifest_path],
            "--task-sets: unknown task set(s) 7; protocol 'cityscapes_cil' defines 1, 2, 12",
        ),
        "not an image": (
            ["infer", "--checkpoint", checkpoint, "--image", checkpoint, "--output-path", "o"],
            f"--image: {checkpoint}: not a readable image",
        ),
        "output is a file": (
            ["infer", "--checkpoint", checkpoint, "--image", image, "--output-path", "file"],
            "--output-path: file is a file, not a folder",
        ),
        "png": (
            ["infer", "--checkpoint", image, "--image", image, "--output-path", "o"],
            f"{image}: cannot load checkpoint: not a readable PyTorch weights file",
        ),
    }[case]
    result = subprocess.run(
        [BIN / "cil", *args], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
    assert "weights_only" not in result.stderr
