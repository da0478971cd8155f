"""Mixed precision from one factory: an autocast context and, for fp16, a gradient scaler.

The training loop never branches on dtype: it enters ``precision.autocast()`` and calls
``precision.backward_step(loss, optimizer)``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from cil_dist.config import ConfigError, PrecisionConfig
from cil_dist.distributed import DistEnv

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass
class Precision:
    device_type: str
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward pass and optimiser step (scaled for fp16)."""
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()


def native_bf16(device_type: str) -> bool:
    """Whether bf16 runs natively (CPUs without AVX512-BF16/AMX emulate it, ~10x slower)."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_dtype(name: str, device_type: str) -> str:
    """``auto`` → bf16 where the hardware has it, else fp16 (CUDA) or fp32 (CPU)."""
    if name != "auto":
        return name
    if native_bf16(device_type):
        return "bf16"
    return "fp16" if device_type == "cuda" else "fp32"


def build_precision(cfg: PrecisionConfig, env: DistEnv) -> Precision:
    if cfg.dtype not in (*DTYPES, "auto"):
        raise ConfigError(
            f"precision.dtype: expected auto or one of {sorted(DTYPES)}, got {cfg.dtype!r}"
        )
    device_type = "cuda" if env.device.startswith("cuda") else "cpu"
    dtype = resolve_dtype(cfg.dtype, device_type)
    if dtype == "fp16" and device_type != "cuda":
        raise ConfigError("precision.dtype: fp16 needs CUDA; use bf16 or fp32 on CPU")
    if dtype != cfg.dtype:
        log.info("precision.dtype auto: %s on this %s", dtype, device_type)
    scaler = torch.amp.GradScaler("cuda") if dtype == "fp16" else None
    return Precision(device_type, DTYPES[dtype], scaler)
