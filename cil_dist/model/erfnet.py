"""ERFNet (Romera et al., 2017) with the reference implementation's module names.

Published checkpoints of the reference are plain state dicts with keys such as
``encoder.initial_block.conv.weight`` … ``decoder.output_conv.bias``; they load as is (with or
without DDP's ``module.`` prefix) through :func:`load_state_dict_checked`.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

BN_EPS = 1e-3


class CheckpointMismatchError(ValueError):
    """A state dict does not fit the model; lists missing, unexpected and mis-shaped keys."""


class DownsamplerBlock(nn.Module):
    """Stride-2 3×3 conv (out − in channels) concatenated with a 2×2 max-pool, BN, ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels - in_channels, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2, stride=2)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(torch.cat([self.conv(x), self.pool(x)], 1)))


class NonBottleneck1d(nn.Module):
    """Factorised residual block: 3×1, 1×3, BN, then dilated 3×1, 1×3, BN, dropout."""

    def __init__(self, channels: int, dropout: float, dilation: int):
        super().__init__()
        self.conv3x1_1 = nn.Conv2d(channels, channels, (3, 1), padding=(1, 0))
        self.conv1x3_1 = nn.Conv2d(channels, channels, (1, 3), padding=(0, 1))
        self.bn1 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.conv3x1_2 = nn.Conv2d(
            channels, channels, (3, 1), padding=(dilation, 0), dilation=(dilation, 1)
        )
        self.conv1x3_2 = nn.Conv2d(
            channels, channels, (1, 3), padding=(0, dilation), dilation=(1, dilation)
        )
        self.bn2 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv3x1_1(x))
        out = F.relu(self.bn1(self.conv1x3_1(out)))
        out = F.relu(self.conv3x1_2(out))
        out = self.bn2(self.conv1x3_2(out))
        if self.dropout.p:
            out = self.dropout(out)
        return F.relu(out + x)


class UpsamplerBlock(nn.Module):
    """Transposed 3×3 conv with stride 2, BN, ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(
            in_channels, out_channels, 3, stride=2, padding=1, output_padding=1
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.initial_block = DownsamplerBlock(3, 16)
        layers: list[nn.Module] = [DownsamplerBlock(16, 64)]
        layers += [NonBottleneck1d(64, 0.03, 1) for _ in range(5)]
        layers.append(DownsamplerBlock(64, 128))
        for _ in range(2):
            layers += [NonBottleneck1d(128, 0.3, d) for d in (2, 4, 8, 16)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.initial_block(x)
        for layer in self.layers:
            x = layer(x)
        return x


class Decoder(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.layers = nn.ModuleList(
            [
                UpsamplerBlock(128, 64),
                NonBottleneck1d(64, 0.0, 1),
                NonBottleneck1d(64, 0.0, 1),
                UpsamplerBlock(64, 16),
                NonBottleneck1d(16, 0.0, 1),
                NonBottleneck1d(16, 0.0, 1),
            ]
        )
        self.output_conv = nn.ConvTranspose2d(16, num_classes, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.output_conv(x)


class ERFNet(nn.Module):
    """ERFNet: logits (N, C, H, W) at the input's size (H, W divisible by 8)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.encoder = Encoder()
        self.decoder = Decoder(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def _strip_module(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state and all(k.startswith("module.") for k in state):
        return {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


def load_state_dict_checked(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "state dict"
) -> None:
    """Load all of ``state_dict`` into ``model`` or raise listing every mismatch."""
    state = _strip_module(state_dict)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: model {tuple(own[k].shape)}, {source} {tuple(state[k].shape)}"
        for k in sorted(set(own) & set(state))
        if own[k].shape != state[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {'; '.join(shapes)}")
        raise CheckpointMismatchError(f"{source} does not fit ERFNet: " + " | ".join(parts))
    model.load_state_dict(state)


# Keys of an ImageNet classification head that a segmentation encoder does not have.
_HEAD_PREFIXES = ("output_conv.", "linear.", "fc.", "classifier.")


def load_encoder_init(model: ERFNet, path: str) -> None:
    """Load a user-supplied encoder initialisation (e.g. ImageNet-pretrained) into ``model``.

    Accepts a plain state dict or ``{"state_dict": ...}``, with keys prefixed by ``encoder.``,
    ``module.encoder.``, ``module.features.encoder.`` or none; classification-head keys are
    dropped with a log line.
    """
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointMismatchError(f"{path}: cannot load encoder initialisation: {exc}") from exc
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise CheckpointMismatchError(f"{path}: expected a state dict, got {type(raw).__name__}")
    state, dropped = {}, []
    for key, value in raw.items():
        for prefix in ("module.", "features.", "encoder."):
            key = key.removeprefix(prefix)
        if key.startswith(_HEAD_PREFIXES):
            dropped.append(key)
            continue
        state[key] = value
    if dropped:
        log.info("%s: dropped classification-head keys %s", path, ", ".join(sorted(dropped)))
    load_state_dict_checked(model.encoder, state, source=path)
    log.info("encoder initialised from %s", path)


def build_model(
    num_classes: int, *, channels_last: bool = False, encoder_init: str | None = None
) -> ERFNet:
    """An ERFNet, optionally with a pre-trained encoder, optionally in channels-last layout."""
    model = ERFNet(num_classes)
    if encoder_init:
        load_encoder_init(model, encoder_init)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
