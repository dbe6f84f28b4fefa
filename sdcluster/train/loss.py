"""The denoising loss of one micro-batch, as in Stable Diffusion's training recipe, and the objective it
trains (:class:`Objective`: what the denoiser predicts from which noised input).

All randomness of a step (VAE posterior sample, caption dropout, noise, offset noise, timesteps) comes from
one generator seeded from (seed, micro-step, rank), drawn in that order. A resumed job therefore draws
exactly what the uninterrupted job would have drawn, whether or not global RNG states were restored, and
ranks draw different noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from sdcluster.derive import derive_int
from sdcluster.models.family import TIME_IDS, empty_caption_key
from sdcluster.models.objectives import Objective

if TYPE_CHECKING:
    from sdcluster.models.load import Components


def step_generator(seed: int, micro_step: int, rank: int) -> torch.Generator:
    """A CPU generator private to one micro-step of one rank (CPU so results do not depend on the device)."""
    # 63 bits: manual_seed takes a signed 64-bit value
    return torch.Generator().manual_seed(derive_int(seed, micro_step, rank, bits=63, byteorder="little"))


def _randn(shape: tuple[int, ...], gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device=like.device, dtype=like.dtype)


def sample_posterior(
    parameters: torch.Tensor, gen: torch.Generator, scaling_factor: float, shift_factor: float | None = None
) -> torch.Tensor:
    """Sample the VAE posterior given its parameters (mean and log-variance stacked on dim 1), shifted (SD3's
    VAE has a ``shift_factor``) and scaled as the denoiser takes latents.

    Used on encoder output and on cached parameters alike, so a cached run draws the very same noise from
    the step's generator as a run that encodes images: the cache changes where the parameters come from,
    never the randomness of a step.
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    with torch.no_grad():
        dist = DiagonalGaussianDistribution(parameters)
        noise = _randn(tuple(dist.mean.shape), gen, dist.mean)
        latents = dist.mean + dist.std * noise
    return scale_latents(latents, scaling_factor, shift_factor)


def scale_latents(latents: torch.Tensor, scaling_factor: float, shift_factor: float | None) -> torch.Tensor:
    """VAE latents as the denoiser takes them: ``(latents - shift) * scale`` (the SD3 pipelines' own
    inverse of their decode); a VAE without a shift (SD 1.x, SDXL) is only scaled."""
    if shift_factor is not None:
        latents = latents - shift_factor
    return latents * scaling_factor


def encode_latents(vae: Any, pixel_values: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Sample the VAE posterior and scale it the way the UNet was trained to expect."""
    with torch.no_grad():
        parameters = vae.encode(pixel_values.to(vae.dtype)).latent_dist.parameters
    return sample_posterior(parameters, gen, vae.config.scaling_factor, vae.config.shift_factor)


def caption_drops(batch_size: int, caption_dropout: float, gen: torch.Generator) -> torch.Tensor | None:
    """Which examples of a micro-batch train on the unconditional caption (``data.caption_dropout``): one
    draw per example from the step's generator, so a cached run and an encoding one drop the same captions,
    and a resumed job the ones the uninterrupted job dropped. None (and nothing drawn, so runs without
    dropout keep their noise) when the probability is 0."""
    if not caption_dropout:
        return None
    return torch.rand(batch_size, generator=gen) < caption_dropout


def _where(
    drop: torch.Tensor, dropped: Mapping[str, torch.Tensor], kept: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per example, ``dropped``'s rows where ``drop`` is set, else ``kept``'s."""
    out = {}
    for kind, tensor in kept.items():
        mask = drop.to(tensor.device).view(-1, *[1] * (tensor.ndim - 1))
        out[kind] = torch.where(mask, dropped[kind].to(tensor.device, tensor.dtype), tensor)
    return out


def _cached_encodings(
    comps: Components, batch: dict[str, torch.Tensor], device: Any, drop: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """The batch's cached caption encodings, the empty caption's cached rows where ``drop`` is set."""
    family = comps.family
    # what the (first) encoder computes in, known without loading it: a cached run leaves them on disk
    dtype = comps.text_encoders.dtype(next(iter(comps.text_encoders)))
    encoded = {kind: batch[kind].to(device, dtype, non_blocking=True) for kind in family.text_arrays}
    if drop is None or not drop.any():
        return encoded
    keys = [empty_caption_key(kind) for kind in family.text_arrays]
    if not all(key in batch for key in keys):
        raise RuntimeError(
            "data.caption_dropout is set, but the latent cache entry holds no empty caption: it was built "
            "for another data.caption_dropout; delete the entry to rebuild it"
        )
    empty = {kind: batch[key] for kind, key in zip(family.text_arrays, keys, strict=True)}
    return _where(drop, empty, encoded)


def conditioning(
    comps: Components,
    batch: dict[str, torch.Tensor],
    device: Any,
    grad: bool = False,
    drop: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The denoiser's conditioning of a batch, as the model's family builds it
    (:mod:`sdcluster.models.family`): from cached encodings when the batch carries them (the family's
    ``text_arrays``), else by running the text encoders on the token ids, with autograd only when ``grad``
    (a text encoder that is trained).

    Examples where ``drop`` is set (:func:`caption_drops`) get the family's unconditional conditioning, made
    from the empty caption: its cached rows, or its token ids in the batch's place, so that a trained text
    encoder (LoRA) runs on ``""`` there, as it would for a caption emptied before tokenizing."""
    family = comps.family
    dropping = drop is not None and bool(drop.any())
    if all(kind in batch for kind in family.text_arrays):
        encoded = _cached_encodings(comps, batch, device, drop)
    else:
        ids = {key: batch[key] for key in family.tokenizers(comps)}
        if dropping:
            from sdcluster.data.dataset import tokenize_captions

            empty_ids = tokenize_captions(family.tokenizers(comps), [""])
            ids = _where(drop, {key: empty_ids[key][0] for key in ids}, ids)
        with torch.set_grad_enabled(grad):
            encoded = family.encode(comps, ids, device)
    if dropping:  # the empty caption's encodings -> what the family's pipelines use for no prompt
        encoded = _where(drop, family.unconditional(encoded), encoded)
    time_ids = batch.get(TIME_IDS)
    return family.conditioning(encoded, None if time_ids is None else time_ids.to(device))


def model_inputs(
    comps: Components,
    batch: dict[str, torch.Tensor],
    device: Any,
    gen: torch.Generator,
    grad_text: bool = False,
    caption_dropout: float = 0.0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """(scaled latents, the denoiser's conditioning) of a batch: from cached encoder outputs when the batch
    carries them (``posterior`` and the family's text arrays), else by running the frozen VAE on
    ``pixel_values`` and the text encoders on the token ids; with ``caption_dropout``, each example's
    caption is dropped with that probability (:func:`caption_drops`, drawn after the posterior sample)."""
    vae = comps.vae
    if "posterior" in batch:
        vae_dtype = next(vae.parameters()).dtype
        parameters = batch["posterior"].to(device, vae_dtype, non_blocking=True)
        latents = sample_posterior(parameters, gen, vae.config.scaling_factor, vae.config.shift_factor)
    else:
        latents = encode_latents(vae, batch["pixel_values"].to(device), gen)
    drop = caption_drops(latents.shape[0], caption_dropout, gen)
    return latents, conditioning(comps, batch, device, grad_text, drop)


def diffusion_loss(
    denoiser: torch.nn.Module,
    objective: Objective,
    latents: torch.Tensor,
    cond: dict[str, Any],
    gen: torch.Generator,
    noise_offset: float = 0.0,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """MSE between the denoiser's prediction and the objective's target for randomly noised latents;
    ``cond`` is the denoiser's conditioning (:func:`conditioning`)."""
    batch = latents.shape[0]
    noise = _randn(tuple(latents.shape), gen, latents)
    if noise_offset:
        noise = noise + noise_offset * _randn((batch, latents.shape[1], 1, 1), gen, latents)
    timesteps = objective.sample_timesteps(batch, gen).to(latents.device)
    noisy, target = objective.noised(latents, noise, timesteps)
    pred = objective.predict(denoiser, noisy, timesteps, cond)  # FLUX's packs and unpacks the latents
    weights = objective.loss_weights(timesteps)  # the objective's own (flow matching's), or None
    if snr_gamma is not None:
        snr = objective.snr_weights(timesteps, snr_gamma)
        weights = snr if weights is None else weights * snr
    if weights is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights.to(per_sample.device)).mean()
