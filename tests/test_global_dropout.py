"""Dropout drawn over the global batch: each sample's channel mask depends on the step's seed and
its position in the global batch only, never on how the batch is split over ranks."""

from __future__ import annotations

import pytest
import torch

from cil_dist.model import ERFNet
from cil_dist.model.global_dropout import GlobalBatchDropout2d, set_dropout_draws


def layer_with_draw(p: float, seed: int, global_batch: int, start: int) -> GlobalBatchDropout2d:
    layer = GlobalBatchDropout2d(p).train()
    set_dropout_draws(torch.nn.Sequential(layer, torch.nn.Linear(1, 1)), seed, global_batch, start)
    return layer


def test_it_drops_whole_channels_at_the_rate_and_scales_like_dropout2d():
    layer = layer_with_draw(0.3, seed=11, global_batch=64, start=0)
    out = layer(torch.ones(64, 128, 4, 5))
    per_channel = out.flatten(2)
    assert torch.equal(per_channel.amax(2), per_channel.amin(2))  # one value per channel
    values = sorted(set(per_channel[..., 0].flatten().tolist()))
    assert values == pytest.approx([0.0, 1 / 0.7])
    dropped = (per_channel[..., 0] == 0).double().mean().item()
    assert dropped == pytest.approx(0.3, abs=0.02)  # 8192 channels: sd 0.005


def test_the_slices_of_two_ranks_are_the_one_rank_masks():
    x = torch.randn(6, 16, 3, 3)
    whole = layer_with_draw(0.5, seed=3, global_batch=6, start=0)(x)
    halves = [layer_with_draw(0.5, seed=3, global_batch=6, start=s)(x[s : s + 3]) for s in (0, 3)]
    thirds = [
        layer_with_draw(0.5, seed=3, global_batch=6, start=s)(x[s : s + 2]) for s in (0, 2, 4)
    ]
    torch.testing.assert_close(torch.cat(halves), whole, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(thirds), whole, rtol=0, atol=0)
    other_seed = layer_with_draw(0.5, seed=4, global_batch=6, start=0)(x)
    assert not torch.equal(other_seed, whole)


def test_without_a_draw_it_is_dropout2d_and_in_eval_it_is_the_identity():
    x = torch.randn(4, 8, 3, 3)
    torch.manual_seed(5)
    plain = torch.nn.Dropout2d(0.3).train()(x)
    torch.manual_seed(5)
    torch.testing.assert_close(GlobalBatchDropout2d(0.3).train()(x), plain, rtol=0, atol=0)
    evaluating = layer_with_draw(0.3, seed=1, global_batch=4, start=0).eval()
    assert torch.equal(evaluating(x), x)


def test_a_slice_past_the_global_batch_is_refused():
    layer = layer_with_draw(0.3, seed=1, global_batch=6, start=4)
    with pytest.raises(ValueError, match="global batch of 6 at 4, got 3 samples"):
        layer(torch.ones(3, 2, 1, 1))


def test_every_erfnet_dropout_shares_the_steps_draw():
    model = ERFNet(5).train()
    layers = [m for m in model.modules() if isinstance(m, GlobalBatchDropout2d)]
    assert len(layers) == 17  # 13 encoder blocks, 4 decoder blocks
    assert {m.p for m in layers} == {0.0, 0.03, 0.3}
    assert not any(type(m) is torch.nn.Dropout2d for m in model.modules())
    x = torch.randn(2, 3, 32, 64)
    set_dropout_draws(model, 9, 2, 0)
    draw = layers[0].draw
    assert all(m.draw is draw for m in layers)
    with torch.no_grad():
        first = model(x)
        set_dropout_draws(model, 9, 2, 0)
        again = model(x)
        set_dropout_draws(model, 10, 2, 0)
        other = model(x)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
