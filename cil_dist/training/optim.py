"""Adam (fused or foreach where available, apex's FusedAdam on request) and the poly schedule."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from cil_dist.accel import require_apex
from cil_dist.config import ConfigError, OptimConfig

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "fused", "foreach", "plain", "apex")


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimConfig
) -> torch.optim.Optimizer:
    """Adam with ``cfg.lr`` and L2 weight decay ``cfg.weight_decay`` (as the reference)."""
    params = list(params)
    kind = cfg.implementation
    if kind not in IMPLEMENTATIONS:
        raise ConfigError(f"optim.implementation: expected one of {IMPLEMENTATIONS}, got {kind!r}")
    if kind == "apex":
        apex = require_apex("optim.implementation=apex")
        return apex.optimizers.FusedAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if kind in ("auto", "fused"):
        try:
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        except (RuntimeError, ValueError) as exc:
            if kind == "fused":
                raise ConfigError(f"optim.implementation=fused: not supported here: {exc}") from exc
            log.info("fused Adam unavailable (%s); using foreach", exc)
    return torch.optim.Adam(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=kind != "plain"
    )


def poly_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig):
    """lr · (1 − epoch / epochs)^power, stepped once per epoch (epoch counted from 0)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: max(0.0, 1 - epoch / cfg.epochs) ** cfg.poly_power
    )
