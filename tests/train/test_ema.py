"""The UNet's EMA: one fused lerp per step, the same average as diffusers' EMAModel."""

from __future__ import annotations

import torch
from diffusers.training_utils import EMAModel

from sdcluster.train.ema import LerpEMA


def test_lerp_update_follows_emamodel():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    model[1].bias.requires_grad_(False)  # EMAModel copies untrained parameters instead of averaging them
    ours = LerpEMA(model.parameters(), decay=0.9, foreach=True)
    theirs = EMAModel(model.parameters(), decay=0.9, foreach=True)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.step(model.parameters())
        theirs.step(model.parameters())
    assert ours.optimization_step == theirs.optimization_step == 5
    assert ours.cur_decay_value == theirs.cur_decay_value
    for a, b, p in zip(ours.shadow_params, theirs.shadow_params, model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
        assert not torch.equal(a, p) or not p.requires_grad
    assert torch.equal(ours.shadow_params[-1], model[1].bias)
