"""The segmentation model (ERFNet) and checked weight loading."""

from cil_dist.model.erfnet import (
    CheckpointMismatchError,
    ERFNet,
    build_model,
    load_encoder_init,
    load_state_dict_checked,
)

__all__ = [
    "CheckpointMismatchError",
    "ERFNet",
    "build_model",
    "load_encoder_init",
    "load_state_dict_checked",
]
