"""FLUX.1 on the family seam (``model=tiny_flux``): its conditioning is the pipeline's, its flow-matching loss
on packed latents is diffusers' reference computation, and both methods train, export and generate on the
same loop as the other families.

The reference (:func:`_reference_loss`) is written from diffusers' own pieces, the way
``examples/dreambooth/train_dreambooth_lora_flux.py`` combines them: ``compute_density_for_timestep_sampling``
-> ``u``, ``timesteps = scheduler.timesteps[(u * num_train_timesteps).long()]``, the sigmas looked up in the
scheduler's table, ``(1 - sigma) * latents + sigma * noise``, packed with ``FluxPipeline._pack_latents``,
image ids from ``FluxPipeline._prepare_latent_image_ids`` at half the latents' size, the guidance value
expanded over the batch when the transformer embeds guidance, ``timestep=timesteps / 1000``, the prediction
unpacked with ``FluxPipeline._unpack_latents`` (the pixel size and the VAE's downsampling factor
``2 ** (len(block_out_channels) - 1)``, as the current script passes them), target ``noise - latents``,
``compute_loss_weighting_for_sd3`` weights, per-example mean then batch mean.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sdcluster.config import ConfigError
from sdcluster.data.dataset import tokenize_captions
from sdcluster.models.embedded import ensure_tiny_model
from sdcluster.models.family import FLUX, Family
from sdcluster.models.load import load_components
from sdcluster.models.objectives import PackedFlowMatching
from sdcluster.train.loop import train
from sdcluster.train.loss import diffusion_loss
from tests.conftest import compose, copy_sample

CAPTIONS = ["a pair of dark blue jeans", "faded denim laid flat on a white background", ""]
FAST = ["train.log_every=1", "train.checkpoint_every=100", "train.validation_prompts=[]"]


@pytest.fixture(scope="module")
def comps(cache_root: Path):
    """The tiny FLUX's components, loaded the way training loads them."""
    cfg = compose(["model=tiny_flux", f"cache_root={cache_root}"])
    loaded = load_components(cfg.model, cfg.cache_root)
    for module in (loaded.denoiser, loaded.vae, *loaded.text_encoders.values()):
        module.eval()
    return loaded


def _encode(comps, captions: list[str]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return comps.family.encode(comps, tokenize_captions(comps.family.tokenizers(comps), captions), "cpu")


def test_the_conditioning_is_the_pipelines_encode_prompt(comps):
    """T5's sequence at 512 tokens and CLIP's pooled output, with zero text ids: exactly
    ``FluxPipeline.encode_prompt``."""
    family = comps.family
    assert isinstance(family, FLUX) and isinstance(family, Family)
    ours = _encode(comps, CAPTIONS)
    pipe = family.pipeline(comps, comps.denoiser, comps.noise_scheduler)
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(CAPTIONS, None, max_sequence_length=FLUX.t5_tokens)
    assert ours["text"].shape == (3, FLUX.t5_tokens, 64) and ours["pooled"].shape == (3, 32)
    torch.testing.assert_close(ours["text"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours["pooled"], pooled, rtol=0, atol=0)
    cond = family.conditioning(ours, None)
    assert set(cond) == {"encoder_hidden_states", "pooled_projections", "txt_ids"}
    torch.testing.assert_close(cond["txt_ids"], text_ids, rtol=0, atol=0)


def _reference_loss(denoiser, scheduler, vae, latents, cond, seed: int, flow) -> torch.Tensor:
    """The FLUX example's loss for one batch, from diffusers' training utilities (see the module doc)."""
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    scheduler = type(scheduler).from_config(scheduler.config)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=gen)  # drawn first, as our loss draws it
    bsz, channels, height, width = latents.shape
    u = compute_density_for_timestep_sampling(
        weighting_scheme=flow.timestep_sampling,
        batch_size=bsz,
        logit_mean=flow.logit_mean,
        logit_std=flow.logit_std,
        mode_scale=flow.mode_scale,
        generator=gen,
    )
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas[step_indices].flatten().view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    packed = FluxPipeline._pack_latents(noisy, bsz, channels, height, width)
    img_ids = FluxPipeline._prepare_latent_image_ids(bsz, height // 2, width // 2, "cpu", latents.dtype)
    guidance = None
    if denoiser.config.guidance_embeds:
        guidance = torch.tensor([flow.guidance_scale]).expand(bsz)
    with torch.no_grad():
        pred = denoiser(
            hidden_states=packed,
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=cond["encoder_hidden_states"],
            txt_ids=cond["txt_ids"],
            img_ids=img_ids,
            return_dict=False,
        )[0]
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    pred = FluxPipeline._unpack_latents(
        pred, height * vae_scale_factor, width * vae_scale_factor, vae_scale_factor
    )
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=flow.loss_weighting, sigmas=sigmas)
    target = noise - latents
    loss = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(bsz, -1), 1)
    return loss.mean()


@pytest.mark.parametrize(
    "flow",
    [
        [],  # logit_normal(0, 1), unweighted, guidance 3.5: the example's defaults
        ["model.flow_matching.guidance_scale=1.0", "model.flow_matching.loss_weighting=sigma_sqrt"],
        ["model.flow_matching.timestep_sampling=mode", "model.flow_matching.loss_weighting=cosmap"],
    ],
    ids=["defaults", "guidance1-sigma_sqrt", "mode-cosmap"],
)
@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_the_loss_is_the_flux_examples_loss(comps, flow, guidance_embeds):
    """Same batch, same generator: our loss equals the reference to float tolerance, for each timestep
    density, loss weighting and guidance value, with a guidance embedding (dev) and without (schnell's
    transformer); the latents are not square, so packing's rows and columns cannot be swapped unnoticed."""
    from diffusers import FluxTransformer2DModel

    denoiser = comps.denoiser
    if not guidance_embeds:
        torch.manual_seed(0)
        denoiser = FluxTransformer2DModel.from_config({**denoiser.config, "guidance_embeds": False}).eval()
    assert comps.noise_scheduler.config.use_dynamic_shifting  # FLUX.1-dev's: training timesteps unshifted
    settings = compose(["model=tiny_flux", *flow]).model.flow_matching
    objective = comps.family.objective(comps.noise_scheduler, None, settings)
    assert isinstance(objective, PackedFlowMatching)
    latents = torch.randn((4, 16, 8, 6), generator=torch.Generator().manual_seed(1))
    cond = comps.family.conditioning(_encode(comps, [*CAPTIONS, "x"]), None)
    for seed in (0, 1, 2):
        with torch.no_grad():
            ours = diffusion_loss(denoiser, objective, latents, cond, torch.Generator().manual_seed(seed))
        reference = _reference_loss(denoiser, comps.noise_scheduler, comps.vae, latents, cond, seed, settings)
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_the_guidance_value_reaches_the_transformer(comps):
    """dev's guidance embedding is fed ``model.flow_matching.guidance_scale``: another value, another
    loss (the reference comparison alone would pass if neither side passed it)."""
    latents = torch.randn((2, 16, 8, 8), generator=torch.Generator().manual_seed(1))
    cond = comps.family.conditioning(_encode(comps, CAPTIONS[:2]), None)
    losses = []
    for value in ("3.5", "1.0"):
        flow = compose(["model=tiny_flux", f"model.flow_matching.guidance_scale={value}"]).model.flow_matching
        objective = comps.family.objective(comps.noise_scheduler, None, flow)
        with torch.no_grad():
            losses.append(diffusion_loss(comps.denoiser, objective, latents, cond, torch.Generator()))
    assert not torch.isclose(losses[0], losses[1])


def test_flux_settings_are_checked_and_a_ddpm_setting_is_refused(comps):
    with pytest.raises(ConfigError, match=r"model\.flow_matching\.guidance_scale"):
        compose(["model=tiny_flux", "model.flow_matching.guidance_scale=-1"])
    with pytest.raises(ConfigError, match=r"train\.prediction_type"):
        comps.family.objective(comps.noise_scheduler, "epsilon")
    with pytest.raises(ConfigError, match=r"generate\.scheduler"):
        comps.family.sampler("dpmpp", comps.noise_scheduler.config)
    objective = comps.family.objective(comps.noise_scheduler)
    odd = torch.zeros((1, 16, 7, 8))  # a 56-pixel side: no 2x2 patches
    with pytest.raises(ValueError, match=r"multiple of 16 pixels.*train\.resolution"):
        objective.predict(comps.denoiser, odd, torch.tensor([500.0]), {})


def _pixels(pipe) -> np.ndarray:
    out = pipe(
        "a pair of jeans",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    )
    return np.asarray(out.images[0], dtype=np.float32)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_both_methods_train_and_export_what_plain_diffusers_loads(make_cfg, tmp_path, method):
    """``task=train model=tiny_flux`` (and ``train.method=lora``): the loss is finite, validation images
    render with the family's pipeline, the generation job writes its images with their seeds, and the export
    loads with plain ``FluxPipeline`` (``from_pretrained``, or ``load_lora_weights`` on the base) and draws
    another image than the base."""
    from diffusers import FluxPipeline

    from sdcluster.generate.job import generate_images

    data = copy_sample(tmp_path / "data", count=4)
    extra = ["train.method=lora", "optim.lr=1e-2"] if method == "lora" else ["optim.lr=1e-3"]
    quick = ["generate.num_images=2", "generate.steps=2", "generate.height=64", "generate.width=64"]
    cfg = make_cfg(["model=tiny_flux", f"data.path={data}", "train.max_steps=2", *FAST, *extra, *quick])
    cfg.train.validation_prompts = ["a pair of jeans"]
    cfg.train.validation_steps = 2
    result = train(cfg)
    assert result.step == 2 and all(np.isfinite(loss) for _, loss in result.losses)
    assert list(result.run_dir.glob("validation/step-*/grid.png")), "validation images were rendered"
    out = generate_images(cfg).out_dir  # the generation job, with the family's pipeline and prompt encoding
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 2 * len(cfg.generate.prompts) and all((out / r["file"]).is_file() for r in records)
    assert len({r["seed"] for r in records}) == len(records), "every image has its own seed"
    base = FluxPipeline.from_pretrained(
        str(ensure_tiny_model(cfg.cache_root, "tiny_flux")), use_safetensors=True
    )
    base.set_progress_bar_config(disable=True)
    before = _pixels(base)
    if method == "lora":
        base.load_lora_weights(str(result.model_dir))
        assert sum("lora_" in name for name in base.transformer.state_dict()) > 0
        after = _pixels(base)
    else:
        trained = FluxPipeline.from_pretrained(str(result.model_dir), use_safetensors=True)
        trained.set_progress_bar_config(disable=True)
        after = _pixels(trained)
    assert np.abs(after - before).max() > 0, "the export changed nothing"


def test_the_text_cache_holds_t5s_output_and_clips_pooled_and_follows_the_loss_of_encoding(
    make_cfg, tmp_path
):
    """The latent cache's text arrays are FLUX's (T5 sequence, CLIP pooled), each caption's row is what the
    encoders make of it, and a cached run follows the loss curve of a run encoding every step."""
    from sdcluster import paths
    from sdcluster.data.latent_cache import CachedExamples, make_plan
    from sdcluster.data.loader import training_rows

    data = copy_sample(tmp_path / "data", count=4)
    base = ["model=tiny_flux", f"data.path={data}", *FAST, "train.max_steps=3", "train.batch_size=2"]
    plain = train(make_cfg([*base, "data.cache=false", f"output_root={tmp_path / 'plain'}"]))
    cfg = make_cfg([*base, f"output_root={tmp_path / 'cached'}"])
    cached = train(cfg)
    comps = load_components(cfg.model, cfg.cache_root)
    plan = make_plan(cfg, training_rows(cfg), comps)
    assert plan.text_arrays == ("text", "pooled")
    entry = CachedExamples(paths.latent_cache_dir(cfg) / plan.key, 2**30, 64, False, True)
    encoded = _encode(comps, plan.captions[:1])
    assert entry.text["text"][0].shape == (FLUX.t5_tokens, 64)
    torch.testing.assert_close(entry.text["text"][0], encoded["text"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entry.text["pooled"][0], encoded["pooled"][0], rtol=1e-5, atol=1e-6)
    expected = [loss for _, loss in plain.losses]
    assert np.allclose([loss for _, loss in cached.losses], expected, rtol=1e-5, atol=0)


def test_the_guidance_value_names_the_run_only_when_changed():
    """Another training guidance value trains something else: another run folder; at the default (3.5), the
    flow settings add nothing to the identity (the pinned hashes of every other model stay)."""
    from sdcluster import identity, paths

    base = ["model=tiny_flux", "data.path=/datasets/sample"]
    default = compose(base)
    assert "flow_matching" not in identity.model_identity(default.model)
    other = compose([*base, "model.flow_matching.guidance_scale=1.0"])
    assert identity.model_identity(other.model)["flow_matching"]["guidance_scale"] == 1.0
    assert paths.run_dir(other) != paths.run_dir(default)
