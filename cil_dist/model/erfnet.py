"""ERFNet (Romera et al., 2017) with the reference implementation's module names.

Published checkpoints of the reference are plain state dicts with keys such as
``encoder.initial_block.conv.weight`` … ``decoder.output_conv.bias``; they load as is (with or
without DDP's ``module.`` prefix) through :func:`load_state_dict_checked`. As in the paper,
students may start from Romera's ImageNet-pretrained encoder (``model.encoder_init``), read
by :func:`load_encoder_init` in the format of that file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cil_dist.model.global_dropout import GlobalBatchDropout2d
from cil_dist.training.checkpoint import WeightsFileError, read_weights

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
        self.dropout = GlobalBatchDropout2d(dropout)

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


def _shown(keys: list[str], limit: int | None) -> str:
    if limit is None or len(keys) <= limit:
        return ", ".join(keys)
    return ", ".join(keys[:limit]) + f" (+{len(keys) - limit} more)"


def mismatch_report(
    own: dict[str, torch.Tensor], state: dict, source: str, limit: int | None = None
) -> str:
    """Missing, unexpected and mis-shaped keys of ``state`` against ``own``; '' if it fits."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    not_tensors = sorted(k for k in set(own) & set(state) if not torch.is_tensor(state[k]))
    shapes = [
        f"{k}: model {tuple(own[k].shape)}, {source} {tuple(state[k].shape)}"
        for k in sorted(set(own) & set(state))
        if torch.is_tensor(state[k]) and own[k].shape != state[k].shape
    ]
    parts = []
    if missing:
        parts.append(f"missing keys: {_shown(missing, limit)}")
    if unexpected:
        parts.append(f"unexpected keys: {_shown(unexpected, limit)}")
    if not_tensors:
        parts.append(f"not tensors: {_shown(not_tensors, limit)}")
    if shapes:
        parts.append(f"shape mismatches: {'; '.join(shapes)}")
    return " | ".join(parts)


def load_state_dict_checked(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "state dict"
) -> None:
    """Load all of ``state_dict`` into ``model`` or raise listing every mismatch."""
    state = _strip_module(state_dict)
    report = mismatch_report(model.state_dict(), state, source)
    if report:
        raise CheckpointMismatchError(f"{source} does not fit ERFNet: {report}")
    model.load_state_dict(state)


ENCODER_INIT_KEY = "model.encoder_init"
ENCODER_INIT_HINT = (
    "download Romera's ImageNet encoder, trained_models/erfnet_encoder_pretrained.pth.tar of "
    "github.com/Eromera/erfnet_pytorch, or set model.encoder_init='' to train from scratch"
)
# Key prefixes of an encoder initialisation, longest first: Romera's ImageNet model saved
# under DataParallel (``module.features.encoder.``) or not, a segmentation encoder saved with
# or without DDP's ``module.``, or a bare encoder state dict.
_ENCODER_PREFIXES = (
    "module.features.encoder.",
    "features.encoder.",
    "module.encoder.",
    "encoder.",
    "module.",
)
# Classification heads that an encoder initialisation may carry and a segmentation encoder does
# not have: the ImageNet classifier (``classifier.linear``, 1000 classes) of Romera's
# imagenet/erfnet_imagenet.py, and the encoder-only training head (``encoder.output_conv``).
_HEAD_KEYS = frozenset(
    f"{head}.{p}" for head in ("classifier.linear", "output_conv") for p in ("weight", "bias")
)
_SHOWN_KEYS = 12  # keys listed per kind in an error line


class EncoderInitError(CheckpointMismatchError):
    """``model.encoder_init`` cannot be used; the message is one line naming the key and file."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{ENCODER_INIT_KEY}: {path}: {reason}")


def read_encoder_file(path: str) -> dict:
    """The state dict of an encoder-initialisation file (``{"state_dict": ...}`` unwrapped)."""
    file = Path(path)
    if not file.exists():
        raise EncoderInitError(path, f"not found ({ENCODER_INIT_HINT})")
    if not file.is_file():
        raise EncoderInitError(path, "not a file")
    try:
        raw = read_weights(str(file))
    except WeightsFileError as exc:
        raise EncoderInitError(path, exc.reason) from None
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise EncoderInitError(path, f"expected a state dict, found {type(raw).__name__}")
    return raw


def encoder_keys(raw: dict) -> tuple[dict, list[str]]:
    """``raw`` with encoder keys made bare, and the classification-head keys left out."""
    state, head = {}, []
    for key, value in raw.items():
        bare = next((key.removeprefix(p) for p in _ENCODER_PREFIXES if key.startswith(p)), key)
        if bare in _HEAD_KEYS:
            head.append(key)
        else:
            state[bare] = value
    return state, sorted(head)


def load_encoder_init(model: ERFNet, path: str) -> None:
    """Initialise ``model.encoder`` from a user-supplied (ImageNet-pretrained) encoder file.

    Accepts Romera's ``erfnet_encoder_pretrained.pth.tar`` as it is (``{"state_dict": ...}``,
    keys ``module.features.encoder.*`` plus the ImageNet classifier, no BatchNorm
    ``num_batches_tracked``) and plain encoder state dicts (keys ``encoder.*`` or bare).
    Missing ``num_batches_tracked`` buffers keep the model's value; any other missing or
    unexpected key, or a shape mismatch, raises :class:`EncoderInitError`. The decoder is
    left untouched.
    """
    state, head = encoder_keys(read_encoder_file(path))
    own = model.encoder.state_dict()
    untracked = [k for k in own if k.endswith(".num_batches_tracked") and k not in state]
    state.update({k: own[k] for k in untracked})
    report = mismatch_report(own, state, "file", limit=_SHOWN_KEYS)
    if report:
        raise EncoderInitError(path, f"does not fit ERFNet's encoder: {report}")
    model.encoder.load_state_dict(state)
    if head:
        log.info("%s: left out the classification head (%s)", path, ", ".join(head))
    log.info(
        "encoder initialised from %s (%d tensors; %d BatchNorm counters absent, kept at their "
        "value)",
        path,
        len(state) - len(untracked),
        len(untracked),
    )


def check_encoder_init(path: str) -> None:
    """Raise :class:`EncoderInitError` unless ``path`` loads as an encoder initialisation."""
    load_encoder_init(ERFNet(1), path)


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
