"""NVIDIA apex, an optional accelerator: used only when its real build is importable.

The PyPI package called ``apex`` is an unrelated web toolkit; NVIDIA's build has
``apex.optimizers`` and ``apex.parallel``, which is what we check for.
"""

from __future__ import annotations

import importlib
import importlib.util

from cil_dist.config import ConfigError


def nvidia_apex_available() -> bool:
    try:
        return importlib.util.find_spec("apex.optimizers") is not None
    except (ImportError, ValueError):
        return False


def require_apex(option: str):
    """The ``apex`` module, or a ConfigError naming ``option`` when NVIDIA apex is absent."""
    if not nvidia_apex_available():
        raise ConfigError(
            f"{option}: NVIDIA apex is not installed (build it from github.com/NVIDIA/apex; the "
            "PyPI package named 'apex' is unrelated). Drop the option to use torch-native "
            "fused Adam and torch.nn.SyncBatchNorm."
        )
    return importlib.import_module("apex")
