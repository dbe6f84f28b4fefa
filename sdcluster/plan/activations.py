"""Activation bytes of one training micro-step, from a table measured once per model shape and resolution.

``sdcluster/assets/memory/activations.json`` is written by ``python -m benchmarks.memory_plan activations``:
for each measured denoiser (by family and parameter count), resolution, gradient checkpointing off and on,
at micro-batch 1 and 2, two numbers (measured on CPU in float32 as the sum of every live tensor's bytes):

- ``bytes``: what a forward and backward pass needs at its peak above the weights and the gradients it
  ends with. The gradients grow while the activations are freed, so a full fine-tune, whose gradients are
  as large as its weights, peaks late in the backward pass with this excess;
- ``forward``: what the forward leaves alive above the weights (what autograd saved for the backward).
  A LoRA step's gradients are small, so it peaks here, at the forward's end
  (:meth:`Activations.above_gradients` takes the higher of the two).

The scaling rule for what was not measured, stated where it is applied:

- **micro-batch**: linear through the two measured batches, ``fixed + batch x per_image`` (the fixed part
  floored at 0). Exact where activations dominate the gradients (a real model at its resolution without
  gradient checkpointing); where they are of the same size the peak moves from the end of the backward pass
  to its start as the batch grows, and the excess grows faster than linearly from batch 1 to 2 (the tiny
  model at 128 px: 0.65 MB, then 5.9 MB): beyond the measured batches the line is an estimate.
- **resolution**: between two measured resolutions of the same model, a power law through them
  (``bytes ~ resolution^k``, ``k`` fitted to the two, applied from the nearer one). Outside the measured
  range (above the largest, below the smallest, or with one resolution measured): ``k = 2``, linear in
  pixels, from the nearest measured one. Convolutions, group norms and memory-efficient attention (the
  GPU path, torch's ``scaled_dot_product_attention``) all hold activations linear in pixels; a ``k``
  fitted on a tiny model is not extrapolated, because there the batch-independent part and the attention
  maps of its few channels weigh more than at true size (the tiny model's 64 -> 128 px fit, ``k = 5.6``,
  would put SD 1.x at 512 px at 229 GiB). The figure is the excess over the gradients a pass ends with;
  where the gradients outweigh the activations (SD 1.x at 256 px: 3.2 GiB against 0.1 GiB of excess) the
  peak sits late in the backward pass, and at larger sizes it can move earlier and grow faster than the
  pixels: the scaled figure is an estimate, checked against a true-size measurement in
  ``docs/performance.md`` ("The memory plan").
- **another denoiser** (a fine-tune's architecture is its base's, so within a family this is rare): the
  measured one with the same first-block width (activations are dominated by the full-resolution blocks,
  whose width that is), then of the same family, then nearest in parameter count, scaled by the ratio of
  their first blocks' channels, and labelled an estimate. So SDXL (true size not measurable on a CPU
  machine: 10 GiB of weights and 10 GiB of gradients) is estimated from SD 1.x's true-size entries (the
  same first block, 320 channels), not from the tiny SDXL model. A family with no entry at all gets 0
  and says so.
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
PIXELS_K = 2.0
"""``bytes ~ resolution^2``: linear in pixels, the rule outside the measured resolutions."""


@dataclass(frozen=True)
class Activations:
    bytes: int
    """The pass's peak above the weights and the gradients it ends with (the table's ``bytes``)."""
    basis: str
    """Where the number comes from: measured, scaled from a measurement, or not measured at all."""
    forward: int | None = None
    """What the forward leaves alive above the weights (the table's ``forward``); None: not in the table."""

    def above_gradients(self, gradients: int, held_in_forward: int) -> Activations:
        """What a micro-step needs above weights and ``gradients``: the backward pass's excess, or, when the
        forward's end is higher (LoRA: small gradients), what the forward saved less the gradients not yet
        made then (all but ``held_in_forward``: those of earlier micro-steps of an accumulation, and
        DDP's buckets, which live across steps)."""
        if self.forward is None or self.forward + held_in_forward - gradients <= self.bytes:
            return self
        at_forward = self.forward + held_in_forward - gradients
        return Activations(at_forward, f"at the forward's end; {self.basis}", self.forward)


@cache
def _entries(path: Path = TABLE) -> tuple[dict[str, Any], ...]:
    if not path.is_file():
        return ()
    return tuple(json.loads(path.read_text())["entries"])


def _at_batch(entry: dict[str, Any], batch: int, key: str = "bytes") -> float:
    one, two = entry[key]["1"], entry[key]["2"]
    per_image = max(two - one, 0)
    return max(one - per_image, 0) + batch * per_image


def _at_resolution(points: list[tuple[int, float]], resolution: int) -> tuple[float, str]:
    """Bytes at ``resolution`` from measured (resolution, bytes) points of one model (see the module)."""
    points = sorted(points)
    exact = [b for r, b in points if r == resolution]
    if exact:
        return exact[0], "measured"
    below = [p for p in points if p[0] < resolution]
    above = [p for p in points if p[0] > resolution]
    if below and above:  # between measured points: the power law they show
        (r0, b0), (r1, b1) = below[-1], above[0]
        k = math.log(b1 / b0) / math.log(r1 / r0) if b0 > 0 and b1 > 0 else PIXELS_K
        fitted = f", fitted between {r0} and {r1} px"
        if abs(resolution - r1) < abs(resolution - r0):  # from the nearer measured point
            r0, b0 = r1, b1
    else:  # outside them: linear in pixels, from the nearest
        (r0, b0), k, fitted = (below[-1] if below else above[0]), PIXELS_K, ", linear in pixels"
    return b0 * (resolution / r0) ** k, f"scaled from {r0} px (bytes ~ resolution^{k:.2f}{fitted})"


def _nearest(entries: list[dict[str, Any]], family: str, params: int, width: int | None) -> dict[str, Any]:
    """The measured model to scale from: same first-block width, then same family, then size (the module)."""
    return min(
        entries,
        key=lambda e: (
            width is None or e.get("width") != width,
            e["family"] != family,
            abs(math.log(e["denoiser_params"] / max(params, 1))),
        ),
    )


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
    same = [e for e in _entries(path) if e["gradient_checkpointing"] == checkpointing]
    if not any(e["family"] == family for e in same):
        return Activations(0, "not measured for this family: the plan is a lower bound")
    nearest = _nearest(same, family, denoiser_params, width)
    model = [e for e in same if e["model"] == nearest["model"]]
    estimated = nearest["denoiser_params"] != denoiser_params or nearest["family"] != family
    ratio = width / nearest["width"] if estimated and width and nearest.get("width") else 1.0
    found: dict[str, float] = {}
    basis = ""
    for key in ("bytes", "forward"):
        if not all(key in e for e in model):  # a table from before ``forward`` was measured
            continue
        points = [(e["resolution"], _at_batch(e, batch, key)) for e in model]
        found[key], basis_of_key = _at_resolution(points, resolution)
        basis = basis or basis_of_key
    if estimated:
        basis = f"estimated from the measured {nearest['model']} ({basis}, x{ratio:.2f} channels)"
    forward = round(found["forward"] * ratio) if "forward" in found else None
    return Activations(round(found["bytes"] * ratio), basis, forward)
