"""Benchmark: one incremental training step (teacher forward, student forward + backward, Adam).

Every row runs in its own process (spawned), so its peak memory (max RSS) is its own, at the
same batch and crop, in the same run:

- ``reference``: the step of the original code (ifnspaml/CIL_Segmentation,
  ``train_erfnet_incremental.py``, PyTorch 1.1): float32; the teacher in eval mode but with
  ``requires_grad=True`` parameters, run without ``no_grad``; the loss of the paper (Klingner et
  al., ITSC 2020, Sec. III; README "Training a stage"), written out below with the teacher's
  softmax **not** detached, so the one ``loss.backward()`` also runs through the teacher and
  computes its weight gradients. They are never used and never zeroed: the optimiser holds only
  the student's parameters, so its ``zero_grad()`` (which in PyTorch 1.1 zeroes in place) leaves
  the teacher's gradients to accumulate, step after step. ``torch.optim.Adam`` at its defaults
  plus weight decay (on CPU that is the single-tensor loop);
- ``default``: this trainer's step with its default configuration (channels_last included):
  the teacher frozen under ``torch.inference_mode()``
  (``cil_dist.training.teacher.teacher_forward``), ``precision.dtype: auto``
  (bf16 on CPUs with native bf16, AVX512-BF16 or AMX; fp32 on the others, where bf16 is
  emulated and many times slower), ``optim.implementation: auto`` (fused Adam where available),
  ``cil_dist.training.losses.incremental_loss``;
- ``fp32``, ``bf16``: the same with ``precision.dtype`` fixed;
- variants of ``default``, one change each: ``contiguous`` (no channels_last for student,
  teacher and input), ``compile`` (``torch.compile`` of the student; its compilation, in the
  first step, is reported apart and counted in the total-time column), ``adam-fused``,
  ``adam-foreach``, ``adam-plain``.

Each row runs ``--warmup`` steps, then ``--steps`` timed ones: ``img/s`` is the steady-state
rate of the timed steps, ``total img/s`` counts every step including the first (and so a
compilation). The reference and the default are always measured; the last line is
``ratio=X.XX`` (the default row's steady-state images/s / the reference's).

    python bench/train_step.py [--batch 6] [--crop 640x192] [--steps 4] [--warmup 1] [--threads N]
                               [--rows reference,default,fp32,contiguous,compile,
                                       adam-fused,adam-foreach,adam-plain]

A quick run: ``python bench/train_step.py --crop 320x96 --steps 2 --rows default``.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import queue as queue_mod
import resource
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cil_dist.config import ModelConfig, OptimConfig, PrecisionConfig, TeacherConfig
from cil_dist.distributed import DistEnv
from cil_dist.labels import IGNORE
from cil_dist.model import ERFNet, build_model
from cil_dist.training.losses import incremental_loss
from cil_dist.training.optim import build_optimizer
from cil_dist.training.precision import Precision, build_precision, native_bf16
from cil_dist.training.teacher import teacher_forward

NUM_OLD, NUM_CLASSES = 5, 11  # teacher and student channels of the benchmarked stage


@dataclass(frozen=True)
class Row:
    """One measured configuration."""

    label: str
    reference: bool = False
    precision: str = "auto"  # this trainer's precision.dtype
    adam: str = "auto"  # this trainer's optim.implementation
    channels_last: bool = ModelConfig().channels_last  # this trainer's default memory format
    compile: bool = False


ROWS = {
    "reference": Row("reference (original step)", reference=True, precision="fp32"),
    "default": Row("this trainer, default"),
    "fp32": Row("this trainer, fp32", precision="fp32"),
    "bf16": Row("this trainer, bf16", precision="bf16"),
    "contiguous": Row("default, no channels_last", channels_last=False),
    "compile": Row("default + torch.compile(student)", compile=True),
    "adam-fused": Row("default + fused Adam", adam="fused"),
    "adam-foreach": Row("default + foreach Adam", adam="foreach"),
    "adam-plain": Row("default + plain Adam", adam="plain"),
}
DEFAULT_ROWS = [name for name in ROWS if name != "bf16"]  # bf16 is `default` where it is native


def reference_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    num_old: int,
    temperature: float = 1.0,
    lambda_gs: float = 1.0,
) -> torch.Tensor:
    """The paper's loss with the teacher's softmax in the graph (as the original code has it).

    CE on the new channels of ``log_softmax`` over all channels, mean over labelled pixels, plus
    ``T² · Σ_unlabelled (1 + λ·H₂(q)) · (−Σ_c q_c log r_c) / #unlabelled``, ``q = softmax(t/T)``
    **not** detached, ``r = softmax(s/T)`` over all student channels, its old channels.
    """
    labelled = labels != IGNORE
    unlabelled = ~labelled
    target = torch.where(labelled, labels - num_old, 0).unsqueeze(1)
    log_p = F.log_softmax(student_logits, dim=1)[:, num_old:]
    ce = -(log_p.gather(1, target).squeeze(1) * labelled).sum() / labelled.sum()
    q = F.softmax(teacher_logits / temperature, dim=1)
    log_r = F.log_softmax(student_logits / temperature, dim=1)[:, :num_old]
    weight = 1.0 + lambda_gs * (-torch.xlogy(q, q).sum(1) / math.log(2))
    per_pixel = weight * -(q * log_r).sum(1)
    kd = temperature**2 * (per_pixel * unlabelled).sum() / unlabelled.sum()
    return ce + kd


def check_reference_loss() -> None:
    """The reference loss equals this trainer's in value and student gradient, and reaches the
    teacher (tiny tensors, float64)."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, NUM_CLASSES, 4, 6, generator=gen, dtype=torch.float64)
    teacher = torch.randn(2, NUM_OLD, 4, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(NUM_OLD, NUM_CLASSES, (2, 4, 6), generator=gen)
    labels[:, :2] = IGNORE
    for temperature, lambda_gs in ((1.0, 1.0), (2.0, 0.5)):
        s_ref, t_ref = student.clone().requires_grad_(), teacher.clone().requires_grad_()
        s_new = student.clone().requires_grad_()
        ref = reference_loss(s_ref, t_ref, labels, NUM_OLD, temperature, lambda_gs)
        new = incremental_loss(
            s_new, teacher, labels, NUM_OLD, temperature=temperature, lambda_gs=lambda_gs
        )[0]
        ref.backward()
        new.backward()
        torch.testing.assert_close(ref, new)
        torch.testing.assert_close(s_ref.grad, s_new.grad)
        if t_ref.grad is None or not t_ref.grad.abs().sum() > 0:
            raise AssertionError("the reference loss must reach the teacher's logits")


def synthetic_batch(batch: int, crop: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images; new-task labels in the lower half, no label (255) in the upper half."""
    width, height = crop
    images = torch.randn(batch, 3, height, width)
    labels = torch.randint(NUM_OLD, NUM_CLASSES, (batch, height, width))
    labels[:, : height // 2] = IGNORE
    return images, labels


def adam_kind(optimizer: torch.optim.Optimizer) -> str:
    """Which implementation an Adam runs (``foreach=None`` on CPU is the single-tensor loop)."""
    defaults = getattr(optimizer, "defaults", {})
    if defaults.get("fused"):
        return "fused"
    return "foreach" if defaults.get("foreach") else "plain"


def reference_parts():
    """Student, trainable eval-mode teacher and Adam as the original builds them."""
    student, teacher = ERFNet(NUM_CLASSES), ERFNet(NUM_OLD)
    teacher.eval()  # parameters keep requires_grad=True
    cfg = OptimConfig()
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return student, teacher, optimizer


def reference_step(student, teacher, optimizer, images, labels) -> None:
    """The original's step: student, then teacher, both with autograd, one backward."""
    optimizer.zero_grad(set_to_none=False)  # PyTorch 1.1: zeroes the student's grads in place
    logits = student(images)
    teacher_logits = teacher(images)  # autograd on, not detached
    cfg = TeacherConfig()
    loss = reference_loss(logits, teacher_logits, labels, NUM_OLD, cfg.temperature, cfg.lambda_gs)
    loss.backward()  # the teacher's .grad accumulates: nothing ever zeroes it
    optimizer.step()


def trainer_parts(row: Row, device: torch.device | str = "cpu"):
    """Student, frozen teacher, optimiser and precision from this trainer's own pieces."""
    memory = torch.channels_last if row.channels_last else torch.preserve_format
    student = build_model(NUM_CLASSES, channels_last=row.channels_last).to(device)
    teacher = ERFNet(NUM_OLD).requires_grad_(False).eval().to(device, memory_format=memory)
    optimizer = build_optimizer(student.parameters(), OptimConfig(implementation=row.adam))
    precision = build_precision(PrecisionConfig(dtype=row.precision), DistEnv(device=str(device)))
    return student, teacher, optimizer, precision


def trainer_step(student, teacher, optimizer, precision: Precision, images, labels) -> None:
    """This trainer's step (``cil_dist.training.train.train_step`` without the data loader)."""
    optimizer.zero_grad(set_to_none=True)
    teacher_logits = teacher_forward(teacher, images, precision)
    with precision.autocast():
        logits = student(images)
    cfg = TeacherConfig()
    total = incremental_loss(
        logits,
        teacher_logits,
        labels,
        NUM_OLD,
        temperature=cfg.temperature,
        lambda_gs=cfg.lambda_gs,
    )[0]
    if not torch.isfinite(total):
        raise FloatingPointError("non-finite loss")
    precision.backward_step(total, optimizer)


def measure(
    row: Row, batch: int, crop: tuple[int, int], steps: int, warmup: int, threads: int
) -> dict:
    """Time ``warmup`` + ``steps`` steps of one row in this process."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    images, labels = synthetic_batch(batch, crop)
    if row.reference:
        student, teacher, optimizer = reference_parts()
        precision_name = "fp32"

        def step() -> None:
            reference_step(student, teacher, optimizer, images, labels)
    else:
        student, teacher, optimizer, precision = trainer_parts(row)
        precision_name = {None: "fp32", torch.bfloat16: "bf16"}.get(precision.dtype, "?")
        if row.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if row.compile:
            student = torch.compile(student)

        def step() -> None:
            trainer_step(student, teacher, optimizer, precision, images, labels)

    student.train()
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if row.reference and any(p.grad is None for p in teacher.parameters()):
        raise AssertionError("the reference step must compute the teacher's gradients")
    timed = times[warmup:]
    return {
        "rate": batch * len(timed) / sum(timed),
        "total_rate": batch * len(times) / sum(times),
        "first_s": times[0],
        "step_s": sum(timed) / len(timed),
        "total_s": sum(times),
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "precision": precision_name,
        "adam": adam_kind(optimizer),
    }


def _child(row: Row, queue, *args) -> None:
    try:
        queue.put(measure(row, *args))
    except Exception as exc:  # reported as the row's result; the other rows still run
        queue.put({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"})


def run_row(row: Row, *args) -> dict:
    """``measure(row, *args)`` in a fresh spawned process (its peak RSS is its own)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(row, queue, *args))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except queue_mod.Empty:
            if not proc.is_alive():
                result = {"error": f"process died (exit code {proc.exitcode})"}
                break
    proc.join()
    return result


def parse_rows(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")
    # The ratios need the reference and the default, measured in the same run.
    first = ["reference", "default"]
    return [*first, *(name for name in dict.fromkeys(names) if name not in first)]


def report(results: dict[str, dict]) -> None:
    base = results["reference"].get("rate")
    print(
        f"{'row':<34} {'prec':>4} {'adam':>7} {'img/s':>6} {'x ref':>6} "
        f"{'1st step':>8} {'total':>7} {'total img/s':>11} {'peak RSS':>9}"
    )
    for name, res in results.items():
        label = ROWS[name].label
        if "error" in res:
            print(f"{label:<34} failed: {res['error']}")
            continue
        ratio = res["rate"] / base if base else float("nan")
        print(
            f"{label:<34} {res['precision']:>4} {res['adam']:>7} {res['rate']:6.2f} "
            f"x{ratio:5.2f} {res['first_s']:7.1f}s {res['total_s']:6.1f}s "
            f"{res['total_rate']:11.2f} {res['peak_mib']:5.0f} MiB"
        )
    compiled = results.get("compile", {})
    if "rate" in compiled:
        compile_s = compiled["first_s"] - compiled["step_s"]
        print(
            f"torch.compile: {compile_s:.1f} s compiling (first step {compiled['first_s']:.1f} s "
            f"- steady step {compiled['step_s']:.2f} s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--crop", default="640x192", help="WIDTHxHEIGHT, both divisible by 8")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=1, help="steps before the timed ones")
    parser.add_argument(
        "--threads", type=int, default=0, help="intra-op threads per row (0: torch's default)"
    )
    parser.add_argument(
        "--rows",
        default=",".join(DEFAULT_ROWS),
        help=f"comma-separated, from {', '.join(ROWS)} (reference and default always run)",
    )
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1:
        raise SystemExit("--steps and --warmup must be at least 1")
    width, height = (int(v) for v in args.crop.split("x"))
    names = parse_rows(args.rows)
    check_reference_loss()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"batch {args.batch}, crop {width}x{height}, {args.warmup} warm-up + {args.steps} timed "
        f"steps, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"native bf16: {'yes' if native_bf16('cpu') else 'no'}"
    )
    run_args = (args.batch, (width, height), args.steps, args.warmup, args.threads)
    results = {name: run_row(ROWS[name], *run_args) for name in names}
    report(results)
    default, reference = results["default"], results["reference"]
    if "rate" not in default or "rate" not in reference:
        raise SystemExit("ratio: the default or the reference row failed")
    print(f"ratio={default['rate'] / reference['rate']:.2f}")


if __name__ == "__main__":
    main()
