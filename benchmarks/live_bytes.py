"""The peak of the sum of live tensor bytes on CPU, for any training step (frozen parameters included).

Torch on CPU has no allocator counters (no ``torch.cuda.max_memory_allocated``); what comes closest to what a
GPU's allocator reports is the bytes of every tensor storage alive at each moment. torch's ``MemTracker``
(``torch.distributed._tools.mem_tracker``) counts that, but torch 2.13's refuses a forward through a module
with frozen parameters (it registers a gradient hook on every parameter it meets: "cannot register a hook on
a tensor that doesn't require gradient"), which is every LoRA step, and its per-module bookkeeping makes even
the tiny model's steps take minutes on two cores. This counter keeps only what the plan is compared with:
each storage counted once (views and in-place results share it), added when an operator first returns it,
subtracted when it is freed, and the highest total seen.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes(*already_alive) as counter: ...``; then ``counter.peak`` (bytes).

    ``already_alive``: tensors that exist before the block (weights, optimizer state, EMA shadows); what the
    block's operators create (activations, gradients, new optimizer state) is seen as it is made. A tensor
    made outside any operator inside the block (``torch.from_numpy``) is counted once an operator returns it.
    """

    def __init__(self, *already_alive: torch.Tensor) -> None:
        super().__init__()
        self._sizes: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        for tensor in already_alive:
            self.track(tensor)

    def track(self, tensor: torch.Tensor) -> None:
        """Count ``tensor``'s storage, once, until it is freed."""
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage._cdata  # the storage itself, whichever Python object or view reaches it
        if key in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        # torch keeps one Python object per live storage, so it dies exactly when the storage does
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.track(value)
        return out


def optimizer_tensors(optimizer: Any) -> list[torch.Tensor]:
    """The tensors an optimizer's state holds now (moments, step counters)."""
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
