"""The UNet's exponential moving average: diffusers' ``EMAModel`` with a cheaper update.

``EMAModel.step(foreach=True)`` computes ``shadow -= (1 - decay) * (shadow - param)`` as ``_foreach_sub``
(a temporary copy of the whole model) followed by ``_foreach_sub_``: three passes over the weights. One
in-place ``torch._foreach_lerp_(shadow, param, 1 - decay)`` is the same average in one pass, half the time
on CPU (22 vs 46 ms a step for the 35M-parameter UNet). Everything else is ``EMAModel``'s own: the decay
schedule, ``shadow_params`` and ``optimization_step`` (checkpointed by :mod:`sdcluster.train.checkpointer`),
``store``/``copy_to``/``restore``, which :func:`ema_weights` wraps for validation and the export.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from diffusers.training_utils import EMAModel


class LerpEMA(EMAModel):
    """``EMAModel`` whose ``step`` is one fused in-place lerp over the trainable parameters."""

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        parameters = list(parameters)
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        pairs = list(zip(self.shadow_params, parameters, strict=True))
        trained = [(s, p) for s, p in pairs if p.requires_grad]
        frozen = [(s, p) for s, p in pairs if not p.requires_grad]
        if trained:
            shadows, params = zip(*trained, strict=True)
            torch._foreach_lerp_(list(shadows), list(params), 1 - decay)
        for shadow, param in frozen:  # EMAModel copies parameters that are not trained
            shadow.copy_(param)


@contextlib.contextmanager
def ema_weights(ema: Any, model: torch.nn.Module) -> Iterator[None]:
    """The EMA weights inside (when there is an EMA), the model's own weights restored bit for bit after."""
    if ema is None:
        yield
        return
    params = list(model.parameters())
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)
