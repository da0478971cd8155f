"""ERFNet: the architecture of Romera et al. (2017), the reference's checkpoint keys, and the
ImageNet encoder initialisation in the format of Romera's erfnet_encoder_pretrained.pth.tar."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cil_dist.model import (
    CheckpointMismatchError,
    EncoderInitError,
    ERFNet,
    build_model,
    load_encoder_init,
    load_state_dict_checked,
)


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


def romera_state_dict(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``encoder``'s weights as Romera's ImageNet model (imagenet/erfnet_imagenet.py, wrapped in
    DataParallel) names them, with its 1000-class classifier and no ``num_batches_tracked``
    (the file predates them)."""
    state = {
        f"module.features.encoder.{k}": v.clone()
        for k, v in encoder.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    state["module.classifier.linear.weight"] = torch.randn(1000, 128)
    state["module.classifier.linear.bias"] = torch.randn(1000)
    return state


def write_romera_encoder(path: Path, encoder: torch.nn.Module | None = None) -> Path:
    """A file in the layout of ``erfnet_encoder_pretrained.pth.tar``: the PyTorch ImageNet
    example's checkpoint dict, written with the legacy (pre-zip) serialisation."""
    encoder = encoder if encoder is not None else trained_encoder()
    payload = {
        "epoch": 90,
        "arch": "erfnet",
        "state_dict": romera_state_dict(encoder),
        "best_prec1": 72.1,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "momentum": 0.9, "params": []}]},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path, _use_new_zipfile_serialization=False)
    return path


def trained_encoder(seed: int = 1) -> torch.nn.Module:
    """An ERFNet encoder whose every tensor differs from a fresh one (BN statistics too)."""
    torch.manual_seed(seed)
    encoder = ERFNet(19).encoder
    with torch.no_grad():
        for value in encoder.state_dict().values():
            if value.is_floating_point():
                value.copy_(torch.rand_like(value) + 0.5)
    return encoder


def assert_encoder_loaded(model: ERFNet, source: torch.nn.Module, decoder_before: dict) -> None:
    loaded = model.encoder.state_dict()
    for key, value in source.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(loaded[key], value), key
    for key, value in model.decoder.state_dict().items():
        assert torch.equal(value, decoder_before[key]), f"decoder changed: {key}"


def test_romera_imagenet_encoder_file_loads_as_is(tmp_path):
    source = trained_encoder()
    path = write_romera_encoder(tmp_path / "erfnet_encoder_pretrained.pth.tar", source)
    model = ERFNet(19)
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    load_encoder_init(model, str(path))
    assert_encoder_loaded(model, source, decoder_before)
    counters = [v for k, v in model.encoder.state_dict().items() if "num_batches" in k]
    assert len(counters) == 2 * 13 + 3 and all(int(c) == 0 for c in counters)


@pytest.mark.parametrize(
    ("prefix", "counters"), [("encoder.", True), ("", False), ("module.encoder.", False)]
)
def test_plain_encoder_state_dicts_load(tmp_path, prefix, counters):
    source = trained_encoder(seed=2)
    state = {
        prefix + k: v
        for k, v in source.state_dict().items()
        if counters or not k.endswith("num_batches_tracked")
    }
    torch.save(state, tmp_path / "encoder.pth.tar")
    model = ERFNet(7)
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    load_encoder_init(model, str(tmp_path / "encoder.pth.tar"))
    assert_encoder_loaded(model, source, decoder_before)


def encoder_init_error(path: Path) -> str:
    with pytest.raises(EncoderInitError) as caught:
        load_encoder_init(ERFNet(19), str(path))
    text = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert text.startswith(f"model.encoder_init: {path}: ") and "\n" not in text, text
    assert "weights_only" not in text, text
    return text


def test_encoder_init_mismatches_name_the_file_and_the_keys(tmp_path):
    good = romera_state_dict(trained_encoder())
    missing = dict(good)
    del missing["module.features.encoder.layers.3.bn1.running_var"]
    torch.save({"state_dict": missing}, tmp_path / "missing.pth.tar")
    assert "missing keys: layers.3.bn1.running_var" in encoder_init_error(
        tmp_path / "missing.pth.tar"
    )
    extra = dict(good, **{"module.decoder.layers.0.conv.weight": torch.zeros(1)})
    extra["module.classifier.fc.weight"] = torch.zeros(1)
    torch.save({"state_dict": extra}, tmp_path / "extra.pth.tar")
    text = encoder_init_error(tmp_path / "extra.pth.tar")
    assert "unexpected keys: classifier.fc.weight, decoder.layers.0.conv.weight" in text
    assert "missing" not in text  # absent num_batches_tracked are not reported
    shaped = dict(good, **{"module.features.encoder.layers.0.conv.weight": torch.zeros(48, 16, 1)})
    torch.save({"state_dict": shaped}, tmp_path / "shape.pth.tar")
    assert "layers.0.conv.weight: model (48, 16, 3, 3), file (48, 16, 1)" in encoder_init_error(
        tmp_path / "shape.pth.tar"
    )


def test_unreadable_encoder_init_files_give_one_line(tmp_path):
    assert "not found (download Romera's ImageNet encoder" in encoder_init_error(
        tmp_path / "pretrained" / "erfnet_encoder_pretrained.pth.tar"
    )
    (tmp_path / "text.pth.tar").write_text("<html>404</html>\n")
    assert "not a readable PyTorch weights file" in encoder_init_error(tmp_path / "text.pth.tar")
    (tmp_path / "empty.pth.tar").write_bytes(b"")
    assert "not a readable PyTorch weights file" in encoder_init_error(tmp_path / "empty.pth.tar")
    torch.save({"state_dict": {"x": Path("/")}}, tmp_path / "objects.pth.tar")
    assert "other than tensors" in encoder_init_error(tmp_path / "objects.pth.tar")
    torch.save([torch.zeros(1)], tmp_path / "list.pth.tar")
    assert "expected a state dict, found list" in encoder_init_error(tmp_path / "list.pth.tar")
    assert "not a file" in encoder_init_error(tmp_path)


def test_cil_train_reports_a_missing_encoder_init_in_one_line(tmp_path, manifest_path, capsys):
    from omegaconf import OmegaConf

    from cil_dist.cli import main
    from tests.helpers import tiny_train_config

    config = tmp_path / "train.yaml"
    cfg = tiny_train_config(manifest_path, tmp_path / "runs")
    config.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    missing = tmp_path / "pretrained" / "erfnet_encoder_pretrained.pth.tar"
    assert main(["train", "--config", str(config), "--set", f"model.encoder_init={missing}"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "encoder_init" in line]
    assert len(lines) == 1 and f"model.encoder_init: {missing}: not found" in lines[0], lines
