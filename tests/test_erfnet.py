"""ERFNet: the architecture of SEED_FACTS and the reference's checkpoint keys."""

from __future__ import annotations

import pytest
import torch

from cil_dist.model import CheckpointMismatchError, ERFNet, build_model, load_state_dict_checked


def reference_key_shapes(num_classes: int) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the reference ERFNet, written out independently."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    def down(prefix: str, cin: int, cout: int) -> None:
        shapes[f"{prefix}.conv.weight"] = (cout - cin, cin, 3, 3)
        shapes[f"{prefix}.conv.bias"] = (cout - cin,)
        bn(f"{prefix}.bn", cout)

    def nb(prefix: str, c: int) -> None:
        for conv, k in (
            ("conv3x1_1", (3, 1)),
            ("conv1x3_1", (1, 3)),
            ("conv3x1_2", (3, 1)),
            ("conv1x3_2", (1, 3)),
        ):
            shapes[f"{prefix}.{conv}.weight"] = (c, c, *k)
            shapes[f"{prefix}.{conv}.bias"] = (c,)
        bn(f"{prefix}.bn1", c)
        bn(f"{prefix}.bn2", c)

    def up(prefix: str, cin: int, cout: int) -> None:
        shapes[f"{prefix}.conv.weight"] = (cin, cout, 3, 3)
        shapes[f"{prefix}.conv.bias"] = (cout,)
        bn(f"{prefix}.bn", cout)

    down("encoder.initial_block", 3, 16)
    down("encoder.layers.0", 16, 64)
    for i in range(1, 6):
        nb(f"encoder.layers.{i}", 64)
    down("encoder.layers.6", 64, 128)
    for i in range(7, 15):
        nb(f"encoder.layers.{i}", 128)
    up("decoder.layers.0", 128, 64)
    nb("decoder.layers.1", 64)
    nb("decoder.layers.2", 64)
    up("decoder.layers.3", 64, 16)
    nb("decoder.layers.4", 16)
    nb("decoder.layers.5", 16)
    shapes["decoder.output_conv.weight"] = (16, num_classes, 2, 2)
    shapes["decoder.output_conv.bias"] = (num_classes,)
    return shapes


def reference_state_dict(num_classes: int = 19) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        k: torch.randn(s, generator=gen) if s else torch.tensor(3)
        for k, s in reference_key_shapes(num_classes).items()
    }


def test_parameter_count_and_output_shape():
    model = ERFNet(19)
    assert sum(p.numel() for p in model.parameters()) == 2_064_191  # "about 2.06 M"
    assert model(torch.randn(2, 3, 64, 128)).shape == (2, 19, 64, 128)


def test_channels_last_gives_the_same_logits():
    model = ERFNet(5).eval()
    x = torch.randn(1, 3, 32, 64)
    fast = build_model(5, channels_last=True).eval()
    fast.load_state_dict(model.state_dict())
    torch.testing.assert_close(
        fast(x.to(memory_format=torch.channels_last)), model(x), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("prefix", ["", "module."])
def test_reference_checkpoint_keys_load_as_is(prefix):
    state = {prefix + k: v for k, v in reference_state_dict().items()}
    model = ERFNet(19)
    load_state_dict_checked(model, state)
    assert torch.equal(model.decoder.output_conv.bias, state[prefix + "decoder.output_conv.bias"])


def test_mismatches_are_listed():
    state = reference_state_dict()
    missing = dict(state)
    del missing["encoder.layers.3.bn1.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: encoder\.layers\.3\.bn1"):
        load_state_dict_checked(ERFNet(19), missing)
    extra = dict(state, **{"encoder.output_conv.weight": torch.zeros(1)})
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys: encoder\.output_conv"):
        load_state_dict_checked(ERFNet(19), extra)
    with pytest.raises(
        CheckpointMismatchError, match=r"decoder\.output_conv\.weight.*\(16, 5, 2, 2\)"
    ):
        load_state_dict_checked(ERFNet(5), state)


def test_encoder_initialisation_round_trip(tmp_path):
    source = ERFNet(19)
    head = {"encoder.output_conv.weight": torch.zeros(1000, 128, 1, 1)}
    encoder = {f"module.encoder.{k}": v for k, v in source.encoder.state_dict().items()}
    torch.save({"state_dict": {**encoder, **head}}, tmp_path / "imagenet.pth")
    model = build_model(5, encoder_init=str(tmp_path / "imagenet.pth"))
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value)
    torch.save({"encoder.bogus": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError, match=r"bad\.pth.*missing keys"):
        build_model(5, encoder_init=str(tmp_path / "bad.pth"))
