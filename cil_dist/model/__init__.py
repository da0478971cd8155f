"""The segmentation model (ERFNet) and checked weight loading."""

from cil_dist.model.erfnet import (
    CheckpointMismatchError,
    EncoderInitError,
    ERFNet,
    build_model,
    check_encoder_init,
    load_encoder_init,
    load_state_dict_checked,
)

__all__ = [
    "CheckpointMismatchError",
    "ERFNet",
    "EncoderInitError",
    "build_model",
    "check_encoder_init",
    "load_encoder_init",
    "load_state_dict_checked",
]
