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

- **micro-batch**: a measured batch as measured; another on the line through the measured batches around it
  (beyond them, through the nearest two), never below 0. Where activations dominate the gradients (a real
  model at its resolution without gradient checkpointing) they are linear in the batch; where they are of
  the same size the peak moves from the end of the backward pass to its start as the batch grows, and the
  excess grows faster than linearly (the tiny model at 128 px: 0.65 MB at batch 1, then 5.9 MB; SDXL at
  1024 px on a GPU: 3.4, 11.6, then 60 GiB at batch 8): beyond the measured batches the line is an estimate.
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
- **a transformer** (SD 3.x, FLUX.1: ``Family.token_sequence``) is a stack of blocks that each run on every
  token of the image's patches and the text, so its activations are linear in its tokens, its depth and its
  width: another resolution is scaled from the nearest measured one by the tokens (FLUX at 1024 px: 4096
  patches + 512 text tokens, against 256 + 512 at 256 px; scaling by pixels would triple it), another model
  of the family (its own family's measured model first: a UNet of its width is no guide) by blocks x width,
  which is its parameter count over its width (parameters ~ blocks x width^2). Checked on CPU against a
  FLUX- and an SD3-shaped model twice as wide and deep as the measured ``small_flux`` and ``small_sd3``
  (``benchmarks/results/transformer_scaling.json``): the forward's bytes within 3% (18-23% above with
  gradient checkpointing, where part of the forward is one block's, which does not grow with depth), and
  256 px from 128 px alone within 5%. The backward's excess over the gradients, scaled alike, comes out
  above what those models measure.
- **mixed precision**: entries measured on a GPU under bf16 autocast (``"precision": "bf16"``, written by
  ``python -m benchmarks.memory_plan gpu-activations``: ``torch.cuda.max_memory_allocated`` less the float32
  weights and the gradients) serve fp16 and bf16 runs of their family; the float32 CPU entries serve the
  rest, and half-precision runs of a family with no GPU entry, for which they are an upper bound (autocast
  keeps activations in half precision, and the GPU's attention kernels keep no attention maps). A GPU entry
  holds the half-precision copies of the weights that autocast made and that are alive at its peak, so the
  plan then counts no copies with the weights (:attr:`Activations.holds_autocast_copies`). Autocast keeps
  every copy it made until its context ends, after the forward: without gradient checkpointing they are
  saved for the backward anyway, and ``forward`` (read after the context) holds them; with it they are
  not, and the forward's end inside the context holds them above ``forward``
  (:attr:`Activations.unsaved_copies`). That is a full fine-tune's peak under gradient accumulation, whose
  earlier micro-steps' gradients are alive in the forward (a 1024 px SDXL step: measured 55.8 GiB, 5 GiB of
  it those copies). A LoRA step makes none (its frozen base already is in the half type): without
  checkpointing they are taken off its figures.
"""

from __future__ import annotations

import dataclasses
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
    holds_autocast_copies: bool = False
    """The figures hold autocast's half-precision copies of the weights (a GPU entry, a full fine-tune)."""
    unsaved_copies: int = 0
    """Autocast's copies alive at the forward's end inside its context but not saved for the backward, so not
    in ``forward`` (a GPU entry of a full fine-tune with gradient checkpointing)."""

    def above_gradients(self, gradients: int, held_in_forward: int) -> Activations:
        """What a micro-step needs above weights and ``gradients``: the backward pass's excess, or, when the
        forward's end is higher (LoRA: small gradients), what the forward saved less the gradients not yet
        made then (all but ``held_in_forward``: those of earlier micro-steps of an accumulation, and
        DDP's buckets, which live across steps)."""
        if self.forward is None:
            return self
        at_forward = self.forward + self.unsaved_copies + held_in_forward - gradients
        if at_forward <= self.bytes:
            return self
        basis = f"at the forward's end; {self.basis}"
        return dataclasses.replace(self, bytes=at_forward, basis=basis)


@cache
def _entries(path: Path = TABLE) -> tuple[dict[str, Any], ...]:
    if not path.is_file():
        return ()
    return tuple(json.loads(path.read_text())["entries"])


def _at_batch(entry: dict[str, Any], batch: int, key: str = "bytes") -> float:
    """A measured micro-batch's bytes as measured; another's on the line through the two measured batches
    around it (1 and 2 on CPU; 1, 2 and 8 on a GPU), or the nearest two beyond them (never decreasing)."""
    measured = sorted((int(b), v) for b, v in entry[key].items())
    exact = [v for b, v in measured if b == batch]
    if exact:
        return exact[0]
    above = next((k for k, (b, _) in enumerate(measured) if b > batch), len(measured) - 1)
    (b0, v0), (b1, v1) = measured[max(above - 1, 0)], measured[max(above, 1)]
    per_image = max((v1 - v0) / (b1 - b0), 0)
    return max(v0 + (batch - b0) * per_image, 0)


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


def tokens_at(sequence: tuple[int, int], resolution: int) -> int:
    """A transformer's tokens per image at ``resolution``: its patches, then the text's."""
    side, text = sequence
    return (resolution // side) ** 2 + text


def _at_tokens(
    points: list[tuple[int, float]], resolution: int, sequence: tuple[int, int]
) -> tuple[float, str]:
    """A transformer's bytes at ``resolution``: a measured one as measured, else linear in its tokens from
    the nearest measured resolution (see the module)."""
    exact = [b for r, b in points if r == resolution]
    if exact:
        return exact[0], "measured"
    r0, b0 = min(points, key=lambda p: (abs(p[0] - resolution), p[0]))
    tokens, measured = tokens_at(sequence, resolution), tokens_at(sequence, r0)
    return b0 * tokens / measured, f"scaled from {r0} px by its tokens, {measured} -> {tokens}"


def _nearest(
    entries: list[dict[str, Any]], family: str, params: int, width: int | None, transformer: bool = False
) -> dict[str, Any]:
    """The measured model to scale from: same first-block width, then same family, then size; a
    transformer's from its own family first (a UNet of its width is no guide to it; see the module)."""

    def key(e: dict[str, Any]) -> tuple[bool, bool, float]:
        other_width, other_family = width is None or e.get("width") != width, e["family"] != family
        size = abs(math.log(e["denoiser_params"] / max(params, 1)))
        return (other_family, other_width, size) if transformer else (other_width, other_family, size)

    return min(entries, key=key)


def activation_bytes(
    family: str,
    denoiser_params: int,
    width: int | None,
    resolution: int,
    batch: int,
    checkpointing: bool,
    half: bool = False,
    adapters: bool = False,
    path: Path = TABLE,
    sequence: tuple[int, int] | None = None,
) -> Activations:
    """Activation bytes of one micro-step of ``batch`` images at ``resolution`` for this denoiser; ``half``:
    under fp16/bf16 autocast, where its family's GPU entries apply; ``adapters``: a LoRA step, whose frozen
    base makes no autocast copies; ``sequence``: a transformer's (pixels per token side, text tokens),
    scaled by tokens and blocks x width (see the module)."""
    same = [e for e in _entries(path) if e["gradient_checkpointing"] == checkpointing]
    on_gpu = [e for e in same if e.get("precision") == "bf16" and e["family"] == family]
    same = on_gpu if half and on_gpu else [e for e in same if e.get("precision", "fp32") == "fp32"]
    if not any(e["family"] == family for e in same):
        return Activations(0, "not measured for this family: the plan is a lower bound")
    nearest = _nearest(same, family, denoiser_params, width, transformer=sequence is not None)
    model = [e for e in same if e["model"] == nearest["model"]]
    estimated = nearest["denoiser_params"] != denoiser_params or nearest["family"] != family
    ratio = width / nearest["width"] if estimated and width and nearest.get("width") else 1.0
    scaled = "channels"
    if sequence is not None and estimated and nearest["family"] == family:  # blocks x width: params / width
        ratio = denoiser_params / nearest["denoiser_params"] / ratio
        scaled = "blocks x width"
    found: dict[str, float] = {}
    basis = ""
    for key in ("bytes", "forward"):
        if not all(key in e for e in model):  # a table from before ``forward`` was measured
            continue
        points = [(e["resolution"], _at_batch(e, batch, key)) for e in model]
        if sequence is None:
            found[key], basis_of_key = _at_resolution(points, resolution)
        else:
            found[key], basis_of_key = _at_tokens(points, resolution, sequence)
        basis = basis or basis_of_key
    if same is on_gpu:
        basis = f"{basis} on a GPU in bf16"
    if estimated:
        basis = f"estimated from the measured {nearest['model']} ({basis}, x{ratio:.2f} {scaled})"
    forward = round(found["forward"] * ratio) if "forward" in found else None
    total = round(found["bytes"] * ratio)
    if same is not on_gpu:
        return Activations(total, basis, forward)
    copies = nearest["autocast_copies"] * denoiser_params // nearest["denoiser_params"]
    if not adapters:
        unsaved = copies if checkpointing else 0
        return Activations(total, basis, forward, holds_autocast_copies=True, unsaved_copies=unsaved)
    if not checkpointing:  # the copies a full pass saved for its backward, which LoRA's half base never makes
        total, forward = max(total - copies, 0), None if forward is None else max(forward - copies, 0)
    return Activations(total, basis, forward)
