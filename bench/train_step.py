"""Benchmark: one incremental training step (student forward + backward + teacher forward).

Compares, at the same batch and crop, in the same run:
- **reference style**: float32, teacher forward with autograd enabled (its graph is built and
  thrown away, as the reference did), no channels_last;
- **this trainer, fp32**: teacher under ``torch.inference_mode()``;
- **this trainer, bf16**: the same under bf16 autocast.
The trainer's default (``precision.dtype: auto``) is bf16 on CPUs with native bf16 (AVX512-BF16
or AMX) and fp32 on the others, where bf16 is emulated and several times slower.
Each mode runs in its own process so its peak memory (max RSS) is its own. The last line is
``ratio=X.XX`` (this trainer's default step on this CPU / reference-style step, images/s).

    python bench/train_step.py [--batch 6] [--crop 640x192] [--steps 4]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import torch

from cil_dist.losses import incremental_loss
from cil_dist.model import ERFNet
from cil_dist.precision import Precision, resolve_dtype
from cil_dist.teacher import teacher_forward

MODES = {
    "reference (fp32, teacher with autograd)": ("reference", None),
    "this trainer, fp32": ("trainer", None),
    "this trainer, bf16": ("trainer", torch.bfloat16),
}


def measure(kind: str, dtype, batch: int, crop: tuple[int, int], steps: int, queue) -> None:
    torch.manual_seed(0)
    width, height = crop
    student, teacher = ERFNet(11), ERFNet(5).eval()
    teacher.requires_grad_(kind == "reference")
    optimizer = torch.optim.Adam(student.parameters(), lr=5e-4, weight_decay=3e-4, foreach=True)
    precision = Precision("cpu", dtype)
    images = torch.randn(batch, 3, height, width)
    labels = torch.randint(5, 11, (batch, height, width))
    labels[:, : height // 2] = 255
    elapsed = 0.0
    for step in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if kind == "reference":
            teacher_logits = teacher(images).detach()
        else:
            teacher_logits = teacher_forward(teacher, images, precision)
        with precision.autocast():
            logits = student(images)
        loss = incremental_loss(logits, teacher_logits, labels, 5)[0]
        loss.backward()
        optimizer.step()
        if step:
            elapsed += time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((batch * steps / elapsed, peak_mib))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--crop", default="640x192")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    crop = tuple(int(v) for v in args.crop.split("x"))
    ctx = mp.get_context("spawn")
    results = {}
    for name, (kind, dtype) in MODES.items():
        queue = ctx.Queue()
        proc = ctx.Process(target=measure, args=(kind, dtype, args.batch, crop, args.steps, queue))
        proc.start()
        results[name] = queue.get()
        proc.join()
    print(
        f"batch {args.batch}, crop {crop[0]}x{crop[1]}, {args.steps} timed steps, "
        f"{torch.get_num_threads()} threads"
    )
    base = results[next(iter(MODES))][0]
    for name, (rate, peak) in results.items():
        print(f"{name:<42} {rate:6.2f} img/s  x{rate / base:4.2f}  peak RSS {peak:7.0f} MiB")
    default = resolve_dtype("auto", "cpu")
    print(f"this trainer's default here (precision.dtype auto): {default}")
    print(f"ratio={results[f'this trainer, {default}'][0] / base:.2f}")


if __name__ == "__main__":
    main()
