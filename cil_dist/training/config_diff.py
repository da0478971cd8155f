"""Which keys of a run's config alter what it trains: a resume refuses a change to those and
allows the others (README "Resuming with a changed config"), and a sweep tells its settings apart
by them. Plain dicts, no torch."""

from __future__ import annotations

from typing import Any

# Keys that change where a run writes, what it logs, measures or keeps, and how it reads or
# waits, never the data, model or optimisation it trains: a resume may change them freely
# (README "Training a stage"). A key and everything under it.
FREE_KEYS = (
    "name",
    "out_dir",
    "log_every",
    "tensorboard",
    "checkpoint.every_epochs",
    "checkpoint.every_steps",
    "checkpoint.keep",
    "checkpoint.resume",
    "checkpoint.allow_config_change",
    "eval",
    "dist",
    "model.channels_last",
    "data.num_workers",
    "data.eval_batch_size",
    "data.endpoint_url",
    "data.block_size",
    "data.read_retries",
    "data.retry_backoff",
    "data.verify_checksums",
    "data.on_shard_error",
    "data.cache_dir",  # where the decoded cache lives, not what it holds
    "data.cache_build_workers",
)


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim.lr": 5e-4, ...}`` of a nested config (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flat_config(value, f"{dotted}.")
        else:
            flat[dotted] = value
    return flat


def is_free(key: str) -> bool:
    return any(key == free or key.startswith(f"{free}.") for free in FREE_KEYS)


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (checkpoint's value, this config's)}`` for the keys that alter the run; keys
    the checkpoint does not record (written by an older version) are not compared."""
    old, new = flat_config(saved), flat_config(current)
    return {
        key: (old[key], value)
        for key, value in new.items()
        if key in old and old[key] != value and not is_free(key)
    }


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """``optim.lr 0.0005 -> 0.001, seed 1 -> 2`` (long values shortened)."""

    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 60 else f"{text[:57]}..."

    return ", ".join(f"{key} {short(a)} -> {short(b)}" for key, (a, b) in changes.items())
