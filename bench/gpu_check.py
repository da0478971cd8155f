"""GPU readiness check: NCCL, the training step, host→device transfer and the data path, on one
CUDA GPU, with the ratios that say whether the data path feeds the step.

On a machine without a CUDA GPU it prints one line and exits 0. ``--allow-cpu`` runs the same
measurements on the CPU instead (gloo instead of NCCL, no pinned memory): a check of the
script itself, not of a GPU.

Rows, each measured in this run:

1. ``nccl``: a one-rank process group (``nccl``; ``gloo`` with ``--allow-cpu``) and one
   all-reduce: the seconds to initialise and the all-reduce's milliseconds.
2. ``step``: the default incremental training step (``bench/train_step.py``'s ``default`` row:
   bf16 autocast, channels_last, frozen teacher under ``torch.inference_mode()``, fused Adam),
   images/s at ``--batch`` and ``--crop``.
3. ``h2d``: uint8 batches of ``--batch`` frames at ``--frame`` (the decoded cache's frames)
   copied from pinned host memory with ``non_blocking=True``: batches/s and GB/s.
4. ``data``: the cached path's per-batch work: gather ``--batch`` random frames from a
   memory-mapped uint8 frame array (the decoded cache's layout) into pinned memory, the copy to
   the device, then the augmentation on the device (``cil_dist.data.device_augment``: rescale,
   crop, flip, jitter, normalise) — samples/s.

The last lines are the ratios ``data / step`` and ``h2d / step`` (in samples per second); above
1 the data path outruns the step.

    python bench/gpu_check.py [--batch 6] [--crop 640x192] [--frame 1024x512] [--steps 20]
                              [--allow-cpu]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cil_dist.config import AugmentConfig
from cil_dist.data.device_augment import DeviceAugment, draw_params

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import Row, synthetic_batch, trainer_parts, trainer_step

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def size(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_process_group(device: torch.device) -> dict:
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    start = time.perf_counter()
    dist.init_process_group(backend, rank=0, world_size=1)
    tensor = torch.ones(1 << 20, device=device)
    dist.all_reduce(tensor)
    synchronize(device)
    init_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(10):
        dist.all_reduce(tensor)
    synchronize(device)
    all_reduce_ms = (time.perf_counter() - start) * 100
    dist.destroy_process_group()
    return {"backend": backend, "init_s": init_s, "all_reduce_ms": all_reduce_ms}


def timed(step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``step`` after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def check_step(device: torch.device, batch: int, crop, steps: int) -> float:
    """Images/s of the default training step on ``device``."""
    student, teacher, optimizer, precision = trainer_parts(Row("default"), device=device)
    images, labels = synthetic_batch(batch, crop)
    images = images.to(device).contiguous(memory_format=torch.channels_last)
    labels = labels.to(device)
    student.train()
    seconds = timed(
        lambda: trainer_step(student, teacher, optimizer, precision, images, labels),
        steps,
        warmup=3,
        device=device,
    )
    return batch / seconds


def host_batch(batch: int, frame, pin: bool) -> torch.Tensor:
    width, height = frame
    tensor = torch.randint(0, 256, (batch, height, width, 3), dtype=torch.uint8)
    return tensor.pin_memory() if pin else tensor


def check_h2d(device: torch.device, batch: int, frame, steps: int) -> tuple[float, float]:
    """Batches/s and GB/s of pinned uint8 frame batches copied to ``device``."""
    pin = device.type == "cuda"
    host = host_batch(batch, frame, pin)

    def copy() -> torch.Tensor:  # on the CPU (--allow-cpu) a real copy, not a no-op
        return host.to(device, non_blocking=True) if pin else host.clone()

    seconds = timed(copy, steps, warmup=2, device=device)
    return 1 / seconds, host.numel() / seconds / 1e9


def check_data(device: torch.device, batch: int, crop, frame, steps: int, frames: int) -> float:
    """Samples/s of the cached path's per-batch work (gather, transfer, device augmentation)."""
    width, height = frame
    pin = device.type == "cuda"
    augment = DeviceAugment(AugmentConfig(crop=list(crop)), MEAN, STD)
    cfg = augment.cfg
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as tmp:
        images = np.lib.format.open_memmap(
            f"{tmp}/images.npy", "w+", np.uint8, (frames, height, width, 3)
        )
        images[:] = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
        labels = np.lib.format.open_memmap(
            f"{tmp}/labels.npy", "w+", np.uint8, (frames, height, width)
        )
        labels[:] = np.random.default_rng(1).integers(0, 19, labels.shape, dtype=np.uint8)
        images.flush(), labels.flush()
        images = np.load(f"{tmp}/images.npy", mmap_mode="r")
        labels = np.load(f"{tmp}/labels.npy", mmap_mode="r")
        image_buffer, label_buffer = host_batch(batch, frame, pin), host_batch(batch, frame, pin)
        label_buffer = label_buffer[..., 0].contiguous()
        if pin:
            label_buffer = label_buffer.pin_memory()
        rng = np.random.default_rng(2)

        def step() -> None:
            index = np.sort(rng.choice(frames, batch, replace=False))
            image_buffer.numpy()[:] = images[index]
            label_buffer.numpy()[:] = labels[index]
            gpu_images = image_buffer.to(device, non_blocking=True)
            gpu_labels = label_buffer.to(device, non_blocking=True)
            params = draw_params(batch, frame, cfg, generator)
            augment(gpu_images, gpu_labels, params, torch.channels_last)

        seconds = timed(step, steps, warmup=2, device=device)
    return batch / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--crop", type=size, default=(640, 192), help="WIDTHxHEIGHT")
    parser.add_argument("--frame", type=size, default=(1024, 512), help="WIDTHxHEIGHT")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--frames", type=int, default=64, help="frames in the mapped array")
    parser.add_argument("--allow-cpu", action="store_true", help="measure on the CPU instead")
    args = parser.parse_args()

    if torch.cuda.is_available():
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        name = torch.cuda.get_device_name(device)
    elif args.allow_cpu:
        device, name = torch.device("cpu"), "CPU (--allow-cpu: checks the script, not a GPU)"
    else:
        print(
            f"gpu_check: skipped, no CUDA GPU here (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'})"
        )
        return 0

    print(f"device: {name}; torch {torch.__version__}, CUDA {torch.version.cuda or '-'}")
    group = check_process_group(device)
    print(
        f"{group['backend']:>5}: init {group['init_s']:.2f} s, all-reduce of 4 MiB "
        f"{group['all_reduce_ms']:.2f} ms"
    )
    step = check_step(device, args.batch, args.crop, args.steps)
    print(f" step: {step:.1f} img/s (default step: bf16 where native, channels_last)")
    batches, gbps = check_h2d(device, args.batch, args.frame, args.steps)
    print(f"  h2d: {batches:.1f} batches/s = {batches * args.batch:.1f} frames/s, {gbps:.2f} GB/s")
    data = check_data(device, args.batch, args.crop, args.frame, args.steps, args.frames)
    print(f" data: {data:.1f} samples/s (gather from mapped frames, transfer, device augmentation)")
    print(f"ratio data/step={data / step:.2f}")
    print(f"ratio h2d/step={batches * args.batch / step:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
