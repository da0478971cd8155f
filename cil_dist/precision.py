"""Mixed precision from one factory: an autocast context and, for fp16, a gradient scaler.

The training loop never branches on dtype: it enters ``precision.autocast()`` and calls
``precision.backward_step(loss, optimizer)``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from cil_dist.config import ConfigError, PrecisionConfig
from cil_dist.distributed import DistEnv

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


def build_precision(cfg: PrecisionConfig, env: DistEnv) -> Precision:
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"precision.dtype: expected one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    device_type = "cuda" if env.device.startswith("cuda") else "cpu"
    if cfg.dtype == "fp16" and device_type != "cuda":
        raise ConfigError("precision.dtype: fp16 needs CUDA; use bf16 or fp32 on CPU")
    scaler = torch.amp.GradScaler("cuda") if cfg.dtype == "fp16" else None
    return Precision(device_type, DTYPES[cfg.dtype], scaler)
