"""Training objectives: what the denoiser learns to predict, from which noised input.

A family (:meth:`sdcluster.models.family.Family.objective`) chooses its objective: DDPM noise or velocity
prediction for SD 1.x/2.x and SDXL (:class:`NoisePrediction`), rectified-flow matching for SD 3.x
(:class:`FlowMatching`) and, on packed latents with FLUX's ids and guidance, for FLUX.1
(:class:`PackedFlowMatching`).
Here, in the models wing, because the family builds it; the loss, the min-SNR weighting, the validation
loss and the export (:mod:`sdcluster.train`) ask it.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Objective(Protocol):
    """What the denoiser is trained to predict, from which noised input: the family's choice
    (:meth:`sdcluster.models.family.Family.objective`). The loss, its min-SNR weighting and the validation
    loss ask it; a flow-matching objective is another implementation, the loop does not change."""

    @property
    def num_timesteps(self) -> int:
        """The training timesteps are ``0 .. num_timesteps - 1`` (the validation loss's fixed ones too)."""
        ...

    def sample_timesteps(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        """One training timestep per example, drawn from ``gen`` only (on the CPU)."""
        ...

    def noised(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the denoiser's input, its target) for ``latents`` noised with ``noise`` at ``timesteps``."""
        ...

    def snr_weights(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
        """Per-example loss weights of min-SNR-gamma at ``timesteps``."""
        ...

    def predict(
        self, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]
    ) -> torch.Tensor:
        """The denoiser's prediction for ``noisy`` latents at ``timesteps`` given its conditioning ``cond``
        (the family's), in the latents' shape."""
        ...

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """The objective's own per-example loss weights at ``timesteps``; None: an unweighted mean."""
        ...

    def configure(self, scheduler: Any) -> None:
        """Make a sampler's config say what the denoiser was trained to predict (an exported pipeline's
        scheduler), so that generation reads it from the export; nothing when it has nothing to say."""
        ...


def call_denoiser(
    denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]
) -> torch.Tensor:
    """The denoiser called on the latents as they are: the timestep by keyword, since a UNet takes it
    second and a transformer (SD3) after its conditioning."""
    return denoiser(noisy, timestep=timesteps, **cond, return_dict=False)[0]


class NoisePrediction:
    """Denoising diffusion with a DDPM noise schedule: the target is the noise (``epsilon``) or the velocity
    (``v_prediction``), as the scheduler's config says, or ``prediction_type`` (``train.prediction_type``)
    when set: it is written into the noise scheduler's config at once, so the training target, the min-SNR
    weights and the validation sampler (built from that config) all agree."""

    def __init__(self, noise_scheduler: Any, prediction_type: str | None = None) -> None:
        self.scheduler = noise_scheduler
        self.prediction_type = prediction_type
        self.configure(noise_scheduler)

    def configure(self, scheduler: Any) -> None:
        if self.prediction_type:  # the source's scheduler may say otherwise than what was trained
            scheduler.register_to_config(prediction_type=self.prediction_type)

    @property
    def num_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def sample_timesteps(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (batch,), generator=gen)

    def noised(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        return noisy, diffusion_target(self.scheduler, latents, noise, timesteps)

    def snr_weights(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
        return min_snr_weights(self.scheduler, timesteps, gamma, self.scheduler.config.prediction_type)

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        return None  # plain MSE (train.snr_gamma weights it, through snr_weights)

    predict = staticmethod(call_denoiser)


def min_snr_weights(
    noise_scheduler: Any, timesteps: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), using diffusers' ``compute_snr``."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return weights / snr
    return weights / (snr + 1)  # v_prediction


def diffusion_target(
    noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet should predict for ``latents`` noised with ``noise``: the noise, or the velocity."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


class FlowMatching:
    """Rectified flow (Stable Diffusion 3.x), as diffusers' ``train_dreambooth_lora_sd3.py`` trains it: the
    input is ``(1 - sigma) * latents + sigma * noise``, the target the velocity ``noise - latents``; each
    example's timestep is the scheduler's training timestep at ``u * num_train_timesteps``, with ``u``
    drawn by ``compute_density_for_timestep_sampling`` (``flow``:
    :class:`sdcluster.config.model.FlowConfig`), so the schedule's shift (the scheduler config's ``shift``)
    applies; the loss is weighted per example by ``compute_loss_weighting_for_sd3``.

    ``sigma = timestep / num_train_timesteps``: how ``FlowMatchEulerDiscreteScheduler`` makes its training
    timesteps from its sigmas (the reference looks the sigma up in the scheduler's table instead; they agree
    to float rounding). Computed rather than looked up, so any timestep has its sigma: the validation loss's
    fixed timesteps too.
    """

    def __init__(self, noise_scheduler: Any, flow: Any = None) -> None:
        from sdcluster.config.model import FlowConfig

        # An own copy at the training schedule: set_timesteps (validation images) rewrites a scheduler's
        # tables, as diffusers' example keeps a copy for the same reason.
        self.scheduler = type(noise_scheduler).from_config(noise_scheduler.config)
        self.flow = flow if flow is not None else FlowConfig()

    def configure(self, scheduler: Any) -> None:
        """Nothing to say: a flow-matching sampler has no prediction type to set."""

    @property
    def num_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def sample_timesteps(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        flow = self.flow
        u = compute_density_for_timestep_sampling(
            weighting_scheme=flow.timestep_sampling,
            batch_size=batch,
            logit_mean=flow.logit_mean,
            logit_std=flow.logit_std,
            mode_scale=flow.mode_scale,
            device="cpu",
            generator=gen,
        )
        # a sigmoid that rounds to 1.0 would index past the table: the last timestep instead
        indices = (u * self.num_timesteps).long().clamp(0, self.num_timesteps - 1)
        return self.scheduler.timesteps[indices]

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Each timestep's noise level, one per example."""
        return timesteps.float() / self.num_timesteps

    def noised(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sigmas = self.sigmas(timesteps).to(latents.device, latents.dtype)
        sigmas = sigmas.view(-1, *[1] * (latents.ndim - 1))
        return (1.0 - sigmas) * latents + sigmas * noise, noise - latents

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        if self.flow.loss_weighting == "none":
            return None  # ones: the plain mean, as the reference's weighted mean of ones is
        return compute_loss_weighting_for_sd3(self.flow.loss_weighting, sigmas=self.sigmas(timesteps))

    def snr_weights(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
        raise ValueError(
            "train.snr_gamma: min-SNR weighting is for DDPM noise schedules; this model trains by flow "
            "matching. Fix: drop train.snr_gamma, and weight the loss with model.flow_matching.loss_weighting"
        )

    predict = staticmethod(call_denoiser)


class PackedFlowMatching(FlowMatching):
    """FLUX.1's flow matching: :class:`FlowMatching` (same noising, target, timesteps and weights), with the
    transformer called as diffusers' ``train_dreambooth_lora_flux.py`` calls it: the noisy latents packed
    into 2x2 patches (``FluxPipeline._pack_latents``) with their image ids
    (``FluxPipeline._prepare_latent_image_ids``, the pipeline's own, at the packed size), the timestep as a
    fraction (``timesteps / 1000``: the transformer scales it back), the guidance value
    (``model.flow_matching.guidance_scale``) when the transformer embeds one (FLUX.1-dev, not schnell), and
    the prediction unpacked to the latents' shape, where the loss is taken."""

    def predict(
        self, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]
    ) -> torch.Tensor:
        from accelerate.utils import extract_model_from_parallel
        from diffusers import FluxPipeline

        batch, channels, height, width = noisy.shape
        if height % 2 or width % 2:
            raise ValueError(
                f"latents of {height}x{width} cannot be packed into 2x2 patches: each image side must be a "
                "multiple of 16 pixels for FLUX.1. Fix: set train.resolution (and data.buckets) to multiples "
                "of 16"
            )
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
        img_ids = FluxPipeline._prepare_latent_image_ids(
            batch, height // 2, width // 2, noisy.device, noisy.dtype
        )
        guidance = None
        if extract_model_from_parallel(denoiser).config.guidance_embeds:  # DDP's wrapper has no config
            guidance = torch.full((batch,), self.flow.guidance_scale, device=noisy.device)
        pred = denoiser(
            hidden_states=packed,
            timestep=timesteps / self.num_timesteps,
            guidance=guidance,
            img_ids=img_ids,
            **cond,
            return_dict=False,
        )[0]
        # _unpack_latents takes the image's pixel size and the VAE's factor; the latents' own size with a
        # factor of 1 is the same computation without knowing the VAE
        return FluxPipeline._unpack_latents(pred, height, width, 1)
