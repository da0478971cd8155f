"""Checkpoints: written atomically by rank 0, loaded with ``weights_only=True``.

A checkpoint holds the model (without DDP's ``module.`` prefix), optimiser, schedule, scaler,
the progress record, RNG states, the resolved config and the task protocol. Files live in
``RUN/checkpoints/`` (:mod:`cil_dist.training.run_folder`): ``epoch_0010.pt`` … (the newest
``keep`` are kept) and ``final.pt``, the one marked ``complete`` (the run trained all its
epochs). This module owns every read of a weights file — local or on object storage
(``s3://``, ``gs://``, ``https://``) —, what a checkpoint holds (:func:`restore` puts it back
into the objects of a run, :func:`describe` says what it is without reading its tensors,
:func:`model_from_checkpoint` builds its model). A file exists only once completely written
(temporary file + rename); a run resumes from the newest one that loads (a file damaged after
the fact is passed over with a warning), and the temporaries of writes a killed job never
finished are removed when the run starts again.
"""

from __future__ import annotations

import io
import logging
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cil_dist import storage, urls
from cil_dist.training import signals
from cil_dist.training.run_folder import FINAL

log = logging.getLogger(__name__)

FORMAT = "cil-dist-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the run; names the file."""


@dataclass
class TrainState:
    """Mutable progress of a run (checkpointed with everything else)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    epoch_step: int = 0  # steps taken of the epoch in progress (a mid-epoch checkpoint)
    samples: int = 0  # training samples seen by all ranks


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def load_failure(exc: Exception) -> str:
    """One line for a file torch.load cannot read (without PyTorch's weights_only advice)."""
    text = str(exc).strip()
    if text.startswith("Weights only load failed"):
        found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        detail = found.group(1).split(". ")[0].rstrip(".") if found else ""
        refused = re.search(r"GLOBAL (\S+)", detail)
        if refused:
            return f"holds Python objects other than tensors and plain containers ({refused[1]})"
        return f"not a readable PyTorch weights file ({detail or 'weights-only loading failed'})"
    first = text.splitlines()[0][:160] if text else ""
    detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return f"not a readable PyTorch weights file ({detail})"


def save_checkpoint(path: str | Path, **payload: Any) -> None:
    """Write ``payload`` (plus the format tag) atomically to ``path``; a preemption signal that
    arrives meanwhile is handled once the file is complete."""
    payload = {"format": FORMAT, **payload}
    with signals.deferred(), storage.open_for_write(str(path)) as stream:
        torch.save(payload, stream)
    log.info("saved checkpoint %s", path)


class WeightsFileError(CheckpointError):
    """A file ``torch.load(weights_only=True)`` cannot read; ``reason`` says why in one line."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


def read_weights(
    path: str, lazy: bool = False, options: storage.StorageOptions | None = None
) -> Any:
    """``torch.load(weights_only=True)`` of a local file or an object-storage URL (reached with
    ``options``); ``lazy`` maps a local file instead of reading its tensors.
    :class:`WeightsFileError` names the file (redacted) and why it does not load (never
    PyTorch's ``weights_only=False`` advice)."""
    shown = urls.redact_url(path)
    try:
        if urls.is_local(path):
            local = urls.local_path(path)
            return torch.load(local, map_location="cpu", weights_only=True, mmap=lazy)
        stream = io.BytesIO(storage.read_bytes(path, options))
        return torch.load(stream, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsFileError(shown, "not found") from None
    except Exception as exc:  # torch.load raises many kinds for a bad file
        raise WeightsFileError(shown, load_failure(exc)) from None


def load_checkpoint(
    path: str | Path, lazy: bool = False, options: storage.StorageOptions | None = None
) -> dict[str, Any]:
    """Load a cil-dist checkpoint, or a plain model state dict (published reference weights);
    ``options``: how an object-storage URL is reached (None: the defaults)."""
    path = str(path)
    if not storage.exists(path, options):
        raise CheckpointError(f"{urls.redact_url(path)}: checkpoint not found")
    try:
        payload = read_weights(path, lazy, options)
    except WeightsFileError as exc:
        raise CheckpointError(f"{exc.path}: cannot load checkpoint: {exc.reason}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(payload).__name__}")
    if payload.get("format") == FORMAT:
        return payload
    if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return {"format": "state_dict", "model": payload}  # a plain reference state dict
    raise CheckpointError(f"{path}: neither a cil-dist checkpoint nor a model state dict")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint is, read without loading its tensors (:func:`describe`)."""

    path: str
    method: str | None
    stage: int | None
    epoch: int | None  # epochs completed
    num_classes: int
    complete: bool  # the run trained every epoch it was configured for


def describe(path: str | Path, options: storage.StorageOptions | None = None) -> CheckpointInfo:
    """Method, stage, epochs and classes of a checkpoint, cheaply (a local file is mapped, not
    read); :class:`CheckpointError` when it does not load."""
    payload = load_checkpoint(path, lazy=True, options=options)
    return CheckpointInfo(
        path=str(path),
        method=payload.get("method"),
        stage=payload.get("stage"),
        epoch=payload.get("state", {}).get("epoch"),
        num_classes=num_classes_of(payload["model"], str(path)),
        # written before the marker existed: a final.pt is complete
        complete=bool(payload.get("complete", Path(str(path)).name == FINAL)),
    )


def restore(
    payload: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any | None = None,
) -> TrainState:
    """Put a cil-dist checkpoint back into a run's objects (weights, optimiser, schedule,
    scaler, RNG states); returns its progress record."""
    from cil_dist.model import load_state_dict_checked

    load_state_dict_checked(model, payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    if scaler is not None and payload.get("scaler"):
        scaler.load_state_dict(payload["scaler"])
    set_rng_state(payload["rng"])
    return TrainState(**payload["state"])


def model_from_checkpoint(
    path: str, device: str, options: storage.StorageOptions | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """An ERFNet with the checkpoint's weights, in eval mode, and the checkpoint payload."""
    from cil_dist.model import ERFNet, load_state_dict_checked

    payload = load_checkpoint(path, options=options)
    model = ERFNet(num_classes_of(payload["model"], path))
    load_state_dict_checked(model, payload["model"])
    return model.to(device).eval(), payload


def num_classes_of(model_state: dict[str, torch.Tensor], path: str = "checkpoint") -> int:
    """Output channels of an ERFNet state dict (from ``decoder.output_conv``)."""
    for key, tensor in model_state.items():
        if key.removeprefix("module.") == "decoder.output_conv.weight":
            return int(tensor.shape[1])
    raise CheckpointError(f"{path}: no decoder.output_conv.weight, not an ERFNet state dict")


def state_to_dict(state: TrainState) -> dict[str, int]:
    return asdict(state)
