"""Batch normalisation over the global batch of all ranks, on any device and backend.

``torch.nn.SyncBatchNorm`` runs only on GPUs; on CPU ranks (gloo) :class:`GlobalBatchNorm2d`
computes the same statistics: per-channel sums and sums of squares are summed over ranks with
an all-reduce whose backward all-reduces their gradients, exactly as SyncBatchNorm's backward
exchanges them. :func:`convert_sync_batchnorm` picks torch's kernel on CUDA and this one
elsewhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward sums the gradients over ranks too."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the batch of every rank (eval: as usual)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            data = x.to(torch.promote_types(x.dtype, torch.float32))
            local = torch.tensor(data.numel() // data.shape[1], dtype=data.dtype)
            stats = torch.cat(
                [data.sum((0, 2, 3)), (data * data).sum((0, 2, 3)), local.to(data.device)[None]]
            )
            stats = _SumOverRanks.apply(stats)
            channels = data.shape[1]
            count = stats[-1]
            mean = stats[:channels] / count
            var = (stats[channels : 2 * channels] / count - mean * mean).clamp_min(0.0)
            self._update_running_stats(mean.detach(), var.detach(), count.detach())
            shape = (1, channels, 1, 1)
            out = (data - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
            if self.affine:
                out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor):
        if not self.track_running_stats:
            return
        self.num_batches_tracked += 1
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * count / (count - 1).clamp_min(1.0)
        self.running_mean.lerp_(mean, momentum)
        self.running_var.lerp_(unbiased, momentum)


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Every BatchNorm2d of ``module`` synchronised over the process group (weights kept)."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert(module)


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlobalBatchNorm2d):
        reference = module.running_mean if module.running_mean is not None else module.weight
        converted = GlobalBatchNorm2d(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            device=reference.device if reference is not None else None,
            dtype=reference.dtype if reference is not None else None,
        )
        converted.load_state_dict(module.state_dict())
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        setattr(module, name, _convert(child))
    return module
