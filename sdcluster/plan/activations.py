"""Activation bytes of one training micro-step, from a table measured once per model shape and resolution.

``sdcluster/assets/memory/activations.json`` is written by ``python -m benchmarks.memory_plan activations``:
for each measured denoiser (by family and parameter count), resolution, gradient checkpointing off and on,
the bytes a forward and backward pass needs above the weights and the gradients it ends with, at
micro-batch 1 and 2 (measured on CPU in float32 with torch's ``MemTracker``, which counts every live
tensor's bytes).

The scaling rule for what was not measured, stated where it is applied:

- **micro-batch**: linear through the two measured batches, ``fixed + batch x per_image`` (the fixed part
  floored at 0). Exact where activations dominate the gradients (a real model at its resolution without
  gradient checkpointing); where they are of the same size the peak moves from the end of the backward pass
  to its start as the batch grows, and the excess grows faster than linearly from batch 1 to 2 (the tiny
  model at 128 px: 1.6 MB, then 11.6 MB): beyond the measured batches the line is an estimate.
- **resolution**: a power law between the two nearest measured resolutions of the same model
  (``bytes ~ resolution^k``, ``k`` fitted to them; ``k = 2`` — linear in pixels — with one resolution
  measured). Above the largest measured one the last ``k`` is extrapolated, which is honest for convolutions
  (linear in pixels) and for memory-efficient attention; CPU attention that materialises the score matrix
  grows faster, which ``k`` fitted on CPU then carries.
- **another denoiser of the same family** (a fine-tune's architecture is its base's, so this is rare): the
  measured one nearest in parameter count, scaled by the ratio of their first blocks' channels (activations
  are dominated by the full-resolution blocks), and labelled an estimate.
- **mixed precision**: not scaled. The table is float32; autocast keeps some activations in half precision,
  so under fp16/bf16 the figure is an upper bound.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from sdcluster.paths import ASSETS

TABLE = ASSETS / "memory" / "activations.json"


@dataclass(frozen=True)
class Activations:
    bytes: int
    basis: str
    """Where the number comes from: measured, scaled from a measurement, or not measured at all."""


@cache
def _entries(path: Path = TABLE) -> tuple[dict[str, Any], ...]:
    if not path.is_file():
        return ()
    return tuple(json.loads(path.read_text())["entries"])


def _at_batch(entry: dict[str, Any], batch: int) -> float:
    one, two = entry["bytes"]["1"], entry["bytes"]["2"]
    per_image = max(two - one, 0)
    return max(one - per_image, 0) + batch * per_image


def _at_resolution(points: list[tuple[int, float]], resolution: int) -> tuple[float, str]:
    """Bytes at ``resolution`` from measured (resolution, bytes) points of one model (see the module)."""
    points = sorted(points)
    exact = [b for r, b in points if r == resolution]
    if exact:
        return exact[0], "measured"
    if len(points) == 1:
        (r0, b0), k = points[0], 2.0
    else:
        below = [p for p in points if p[0] < resolution] or points[:1]
        above = [p for p in points if p[0] > resolution] or points[-1:]
        (r0, b0), (r1, b1) = (below[-1], above[0]) if below[-1] != above[0] else (points[-2], points[-1])
        k = math.log(b1 / b0) / math.log(r1 / r0) if b0 > 0 and b1 > 0 and r1 != r0 else 2.0
        if abs(resolution - r1) < abs(resolution - r0):  # from the nearer measured point
            r0, b0 = r1, b1
    return b0 * (resolution / r0) ** k, f"scaled from {r0} px (bytes ~ resolution^{k:.2f})"


def activation_bytes(
    family: str,
    denoiser_params: int,
    width: int | None,
    resolution: int,
    batch: int,
    checkpointing: bool,
    path: Path = TABLE,
) -> Activations:
    """Activation bytes of one micro-step of ``batch`` images at ``resolution`` for this denoiser."""
    same = [
        e for e in _entries(path) if e["family"] == family and e["gradient_checkpointing"] == checkpointing
    ]
    if not same:
        return Activations(0, "not measured for this family: the plan is a lower bound")
    nearest = min(same, key=lambda e: abs(math.log(e["denoiser_params"] / max(denoiser_params, 1))))
    model = [e for e in same if e["denoiser_params"] == nearest["denoiser_params"]]
    points = [(e["resolution"], _at_batch(e, batch)) for e in model]
    value, basis = _at_resolution(points, resolution)
    if nearest["denoiser_params"] != denoiser_params:
        ratio = width / nearest["width"] if width and nearest.get("width") else 1.0
        value *= ratio
        basis = f"estimated from the measured {nearest['model']} ({basis}, x{ratio:.2f} channels)"
    return Activations(round(value), basis)
