"""Stable Diffusion 3 on the family seam (``model=tiny_sd3``): its conditioning is the pipeline's, its
flow-matching loss is diffusers' reference computation, and both methods train, export and generate on the
same loop as SD 1.x and SDXL.

The reference (:func:`_reference_loss`) is written from diffusers' own pieces, the way
``examples/dreambooth/train_dreambooth_lora_sd3.py`` combines them: ``compute_density_for_timestep_sampling``
-> ``u``, ``timesteps = scheduler.timesteps[(u * num_train_timesteps).long()]``, the sigmas looked up in the
scheduler's table (its ``get_sigmas``), ``(1 - sigma) * latents + sigma * noise``, target ``noise - latents``,
``compute_loss_weighting_for_sd3`` weights, per-example mean then batch mean.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from sdcluster.config import ConfigError
from sdcluster.data.dataset import tokenize_captions
from sdcluster.models.embedded import ensure_tiny_model
from sdcluster.models.family import SD3, Family
from sdcluster.models.load import load_components
from sdcluster.models.objectives import FlowMatching
from sdcluster.train.loop import train
from sdcluster.train.loss import diffusion_loss
from tests.conftest import compose, copy_sample

CAPTIONS = ["a pair of dark blue jeans", "faded denim laid flat on a white background", ""]
FAST = ["train.log_every=1", "train.checkpoint_every=100", "train.validation_prompts=[]"]


@pytest.fixture(scope="module")
def comps(cache_root: Path):
    """The tiny SD3's components, loaded the way training loads them."""
    cfg = compose(["model=tiny_sd3", f"cache_root={cache_root}"])
    loaded = load_components(cfg.model, cfg.cache_root)
    for module in (loaded.denoiser, loaded.vae, *loaded.text_encoders.values()):
        module.eval()
    return loaded


def _pipeline(comps):
    return comps.family.pipeline(comps, comps.denoiser, comps.noise_scheduler)


def test_the_conditioning_is_the_pipelines_encode_prompt(comps):
    """CLIP states padded to the T5 width, then T5's sequence; the two pooled projections concatenated:
    exactly ``StableDiffusion3Pipeline.encode_prompt`` at the training sequence length."""
    family = comps.family
    assert isinstance(family, SD3) and isinstance(family, Family)
    with torch.no_grad():
        ours = family.encode(comps, tokenize_captions(family.tokenizers(comps), CAPTIONS), "cpu")
        embeds, _, pooled, _ = _pipeline(comps).encode_prompt(
            CAPTIONS, None, None, do_classifier_free_guidance=False, max_sequence_length=SD3.t5_tokens
        )
    assert ours["text"].shape == (3, 77 + SD3.t5_tokens, 64)  # CLIP's 77 tokens, then T5's
    torch.testing.assert_close(ours["text"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours["pooled"], pooled, rtol=0, atol=0)
    cond = family.conditioning(ours, None)
    assert set(cond) == {"encoder_hidden_states", "pooled_projections"}


def _reference_loss(comps, latents, cond, seed: int, flow) -> torch.Tensor:
    """The SD3 example's loss for one batch, from diffusers' training utilities (see the module doc)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    scheduler = type(comps.noise_scheduler).from_config(comps.noise_scheduler.config)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=gen)  # drawn first, as our loss draws it
    u = compute_density_for_timestep_sampling(
        weighting_scheme=flow.timestep_sampling,
        batch_size=latents.shape[0],
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
    with torch.no_grad():
        pred = comps.denoiser(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
        )[0]
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=flow.loss_weighting, sigmas=sigmas)
    target = noise - latents
    loss = torch.mean(
        (weighting.float() * (pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1
    )
    return loss.mean()


@pytest.mark.parametrize(
    "flow",
    [
        [],  # logit_normal(0, 1), unweighted: the example's defaults
        [
            "model.flow_matching.logit_mean=0.5",
            "model.flow_matching.logit_std=0.7",
            "model.flow_matching.loss_weighting=sigma_sqrt",
        ],
        ["model.flow_matching.timestep_sampling=mode", "model.flow_matching.mode_scale=1.0"],
        ["model.flow_matching.timestep_sampling=none", "model.flow_matching.loss_weighting=sigma_sqrt"],
    ],
    ids=["logit_normal", "logit_normal-shifted-sigma_sqrt", "mode", "uniform-sigma_sqrt"],
)
def test_the_loss_is_the_sd3_examples_loss(comps, flow):
    """Same batch, same generator: our loss equals the reference to float tolerance, for each timestep
    density and loss weighting; the schedule's shift (3.0 in SD 3.5's scheduler config) applies."""
    assert comps.noise_scheduler.config.shift == 3.0
    settings = compose(["model=tiny_sd3", *flow]).model.flow_matching
    objective = comps.family.objective(comps.noise_scheduler, None, settings)
    assert isinstance(objective, FlowMatching)
    latents = torch.randn((4, 16, 8, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        encoded = comps.family.encode(
            comps, tokenize_captions(comps.family.tokenizers(comps), [*CAPTIONS, "x"]), "cpu"
        )
        cond = comps.family.conditioning(encoded, None)
    for seed in (0, 1, 2):
        with torch.no_grad():
            ours = diffusion_loss(
                comps.denoiser, objective, latents, cond, torch.Generator().manual_seed(seed)
            )
        reference = _reference_loss(comps, latents, cond, seed, settings)
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_flow_settings_are_checked_and_a_ddpm_setting_is_refused(comps):
    """A typo in a flow setting, min-SNR or a prediction type: each a clear error naming the fix."""
    with pytest.raises(ConfigError, match=r"model\.flow_matching\.timestep_sampling"):
        compose(["model=tiny_sd3", "model.flow_matching.timestep_sampling=lognorm"])
    with pytest.raises(ConfigError, match=r"train\.prediction_type"):
        comps.family.objective(comps.noise_scheduler, "v_prediction")
    objective = comps.family.objective(comps.noise_scheduler)
    with pytest.raises(ValueError, match=r"train\.snr_gamma"):
        objective.snr_weights(torch.tensor([500.0]), 5.0)
    with pytest.raises(ConfigError, match=r"generate\.scheduler"):
        comps.family.sampler("dpmpp", comps.noise_scheduler.config)


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
    """``task=train model=tiny_sd3`` (and ``train.method=lora``): the loss is finite, validation images
    render with the family's sampler, and the export loads with plain ``StableDiffusion3Pipeline``
    (``from_pretrained``, or ``load_lora_weights`` on the base) and draws another image than the base."""
    from diffusers import StableDiffusion3Pipeline

    from sdcluster.generate.job import generate_images

    data = copy_sample(tmp_path / "data", count=4)
    extra = ["train.method=lora", "optim.lr=1e-2"] if method == "lora" else ["optim.lr=1e-3"]
    quick = ["generate.num_images=2", "generate.steps=2", "generate.height=64", "generate.width=64"]
    cfg = make_cfg(["model=tiny_sd3", f"data.path={data}", "train.max_steps=2", *FAST, *extra, *quick])
    cfg.train.validation_prompts = ["a pair of jeans"]
    cfg.train.validation_steps = 2
    result = train(cfg)
    assert result.step == 2 and all(np.isfinite(loss) for _, loss in result.losses)
    assert list(result.run_dir.glob("validation/step-*/grid.png")), "validation images were rendered"
    out = generate_images(cfg).out_dir  # the generation job, with the family's pipeline and sampler
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 2 * len(cfg.generate.prompts) and all((out / r["file"]).is_file() for r in records)
    base = StableDiffusion3Pipeline.from_pretrained(
        str(ensure_tiny_model(cfg.cache_root, "tiny_sd3")), use_safetensors=True
    )
    base.set_progress_bar_config(disable=True)
    before = _pixels(base)
    if method == "lora":
        base.load_lora_weights(str(result.model_dir))
        assert sum("lora_" in name for name in base.transformer.state_dict()) > 0
        after = _pixels(base)
    else:
        trained = StableDiffusion3Pipeline.from_pretrained(str(result.model_dir), use_safetensors=True)
        trained.set_progress_bar_config(disable=True)
        after = _pixels(trained)
    assert np.abs(after - before).max() > 0, "the export changed nothing"


def test_the_text_cache_holds_t5s_encodings_and_follows_the_loss_of_encoding(make_cfg, tmp_path):
    """The latent cache's text arrays are the family's (CLIP + T5 sequence, pooled), each caption's row is
    what the encoders make of it, and a cached run follows the loss curve of a run encoding every step."""
    from sdcluster import paths
    from sdcluster.data.latent_cache import CachedExamples, make_plan
    from sdcluster.data.loader import training_rows

    data = copy_sample(tmp_path / "data", count=4)
    base = ["model=tiny_sd3", f"data.path={data}", *FAST, "train.max_steps=3", "train.batch_size=2"]
    plain = train(make_cfg([*base, "data.cache=false", f"output_root={tmp_path / 'plain'}"]))
    cfg = make_cfg([*base, f"output_root={tmp_path / 'cached'}"])
    cached = train(cfg)
    comps = load_components(cfg.model, cfg.cache_root)
    plan = make_plan(cfg, training_rows(cfg), comps)
    assert plan.text_arrays == ("text", "pooled")
    entry = CachedExamples(paths.latent_cache_dir(cfg) / plan.key, 2**30, 64, False, True)
    with torch.no_grad():
        ids = tokenize_captions(comps.family.tokenizers(comps), plan.captions[:1])
        encoded = comps.family.encode(comps, ids, "cpu")
    row = entry.text["text"][0]
    assert row.shape == (77 + SD3.t5_tokens, 64)
    torch.testing.assert_close(row[77:], encoded["text"][0, 77:], rtol=1e-5, atol=1e-6)  # T5's part
    torch.testing.assert_close(entry.text["pooled"][0], encoded["pooled"][0], rtol=1e-5, atol=1e-6)
    expected = [loss for _, loss in plain.losses]
    assert np.allclose([loss for _, loss in cached.losses], expected, rtol=1e-5, atol=0)


def test_flow_settings_name_the_run_only_when_changed():
    """A changed flow-matching setting trains something else: another run folder; at the defaults, the
    settings add nothing to the identity (the pinned hashes of every other model stay)."""
    from sdcluster import identity, paths

    base = ["model=tiny_sd3", "data.path=/datasets/sample"]
    default = compose(base)
    assert "flow_matching" not in identity.model_identity(default.model)
    weighted = compose([*base, "model.flow_matching.loss_weighting=sigma_sqrt"])
    assert identity.model_identity(weighted.model)["flow_matching"]["loss_weighting"] == "sigma_sqrt"
    assert paths.run_dir(weighted) != paths.run_dir(default)


@pytest.mark.parametrize(
    ("model", "setting"),
    [
        ("tiny_sd3", "train.snr_gamma=5.0"),
        ("tiny_sd3", "train.prediction_type=v_prediction"),
        ("tiny_sd3", "train.lora.text_encoder_lr=5e-6"),
        ("tiny_flux", "train.lora.text_encoder_lr=5e-6"),
    ],
)
def test_a_ddpm_or_text_encoder_setting_is_refused_before_the_queue(make_cfg, model, setting):
    """The launch reads the family from the model's index and refuses what flow matching cannot train
    with, naming the key and the fix; the same settings pass on SD 1.x."""
    from sdcluster.cluster.preflight import preflight

    lora = ["train.method=lora"] if "lora." in setting else []
    key = setting.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}=.*not supported .* Fix: drop {re.escape(key)}"):
        preflight(make_cfg([f"model={model}", *lora, setting]), dry_run=True)
    preflight(make_cfg(["model=tiny", *lora, setting]), dry_run=True)
