"""Full fine-tuning and LoRA, of SD 1.x and of SDXL, on one code path: the guarantees every combination
keeps, and what LoRA adds (small, portable).

The shared guarantees (learning, exact resume, the latent cache, an export plain diffusers loads, the same
image for a seed at any batch size) are one test each, parametrized over ``train.method`` x the model family
(``tiny``: SD 1.x, ``tiny_sdxl``: SDXL). Every run is an embedded model on the sample data for a few steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdcluster import paths
from sdcluster.config import ConfigError
from sdcluster.runtime.step_events import stop_at
from sdcluster.train import step_folders
from sdcluster.train.loop import TrainResult, train
from tests.conftest import compose, copy_sample

FAST = ["train.log_every=1", "train.checkpoint_every=100", "train.validation_prompts=[]"]
LORA = ["train.method=lora"]
METHODS = {"full": [], "lora": LORA}
FAMILIES = {"sd1": ["model=tiny"], "sdxl": ["model=tiny_sdxl"]}
COMBINATIONS = [(method, family) for family in sorted(FAMILIES) for method in sorted(METHODS)]
each_combination = pytest.mark.parametrize(("method", "family"), COMBINATIONS)
LORA_FILE = "pytorch_lora_weights.safetensors"


def _checkpoint(result: TrainResult) -> Path:
    return step_folders.complete_checkpoints(result.run_dir / "checkpoints")[0]


def _trained_tensors(result: TrainResult) -> dict[str, torch.Tensor]:
    """What the newest checkpoint holds of the trained weights (and their EMA), by file and name."""
    folder = _checkpoint(result)
    found = {}
    for file in sorted([*folder.glob("model*.safetensors"), folder / "ema.safetensors"]):
        found.update({f"{file.name}:{k}": v for k, v in load_file(str(file)).items()})
    return found


def _base_pipeline(source: str | Path, family: str = "sd1"):
    """The pipeline at ``source`` the way a diffusers user loads it, with the family's own class."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(str(source), use_safetensors=True)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(str(source), safety_checker=None, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _lora_tensors(module: torch.nn.Module) -> int:
    """How many LoRA tensors a loaded module holds (diffusers can drop some of a file silently)."""
    return sum("lora_" in name for name in module.state_dict())


def _pixels(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    out = pipe("a pair of jeans", num_inference_steps=2, height=64, width=64, generator=generator)
    return np.asarray(out.images[0], dtype=np.float32)


# --- identity and checks: no training --------------------------------------------------------------------


def test_a_lora_sweep_is_one_run_folder_per_point():
    """``-m train.lora.rank=4,8 optim.lr=1e-4,5e-5``: four points, four run folders, none a full run's."""
    base = ["data.path=/datasets/sample", *LORA]
    points = [[*base, f"train.lora.rank={r}", f"optim.lr={lr}"] for r in (4, 8) for lr in ("1e-4", "5e-5")]
    folders = {paths.run_dir(compose(p)) for p in points}
    assert len(folders) == 4
    full = paths.run_dir(compose(["data.path=/datasets/sample", "optim.lr=1e-4"]))
    assert full not in folders
    for key in ("alpha=8", "dropout=0.1", "target_modules=[to_q,to_v]", "text_encoder_lr=1e-5"):
        assert paths.run_dir(compose([*points[0], f"train.lora.{key}"])) != paths.run_dir(compose(points[0]))
    # exporting a fused copy too changes nothing that is learned: the same run (it resumes)
    fused = compose([*points[0], "train.lora.fuse_export=true"])
    assert paths.run_dir(fused) == paths.run_dir(compose(points[0]))


def test_lora_keys_with_a_full_fine_tune_are_refused():
    with pytest.raises(ConfigError, match=r"train\.lora\.rank: .*Fix: add train\.method=lora"):
        compose(["train.lora.rank=8"])
    with pytest.raises(ConfigError, match=r"train\.method: got 'qlora'"):
        compose(["train.method=qlora"])


def test_generate_lora_must_name_safetensors_weights(tmp_path):
    with pytest.raises(ConfigError, match=r"generate\.lora: .*is not a \.safetensors file"):
        compose([f"generate.lora={tmp_path}"])  # a folder without pytorch_lora_weights.safetensors
    pickle = tmp_path / "weights.bin"
    pickle.write_bytes(b"not loaded")
    with pytest.raises(ConfigError, match=r"generate\.lora"):
        compose([f"generate.lora={pickle}"])


def test_generation_folder_follows_the_lora_and_its_scale(tmp_path):
    weights = tmp_path / "style.safetensors"
    weights.write_bytes(b"")
    plain = compose(["generate.model=/models/base"])
    with_lora = compose(["generate.model=/models/base", f"generate.lora={weights}"])
    half = compose(["generate.model=/models/base", f"generate.lora={weights}", "generate.lora_scale=0.5"])
    assert len({paths.generation_dir(c) for c in (plain, with_lora, half)}) == 3
    # after a LoRA run, generation uses its base model and its own export by default
    run = compose(LORA)
    assert paths.generation_model(run) == "tiny"
    assert paths.generation_lora(run) == paths.run_paths(run).lora


def test_only_adapters_are_trained_in_float32(make_cfg):
    from sdcluster.train.trainer import build_trainer

    t = build_trainer(make_cfg([*FAST, *LORA, "train.lora.text_encoder_lr=3e-5", "optim.lr=1e-4"]))
    optimizer = getattr(t.optimizer, "optimizer", t.optimizer)
    unet_group, text_group = optimizer.param_groups
    assert (unet_group["lr"], text_group["lr"]) == (1e-4, 3e-5)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in t.params}
    assert all("lora_" in name for name in t.param_names)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in t.params)
    frozen = [p for p in t.denoiser.parameters() if not p.requires_grad]
    assert frozen and sum(p.numel() for p in t.params) < 0.2 * sum(p.numel() for p in frozen)


# --- whole runs ------------------------------------------------------------------------------------------


def _one_image(tmp_path: Path) -> Path:
    return copy_sample(tmp_path / "one", count=1)


@pytest.mark.slow
@each_combination
def test_loss_goes_down_on_one_batch(make_cfg, tmp_path, method, family):
    """A fixed (image, noise, timestep) loss is lower with what the run exported, loaded with plain
    diffusers (the family's pipeline class; a LoRA on the base model with ``load_lora_weights``), than
    with the base model."""
    from sdcluster.data.dataset import TrainImages, collate, load_captioned_images
    from sdcluster.models.load import load_components
    from sdcluster.train.loss import conditioning, diffusion_loss, encode_latents, step_generator

    folder = _one_image(tmp_path)
    # The tiny UNet's attention projections (LoRA's targets) are a small part of it: a LoRA fits the image
    # less in 15 steps than the whole UNet does, so it is asked for less (both are far above the noise of
    # a fixed evaluation, which is exactly repeatable).
    settings = {
        "full": ["optim.lr=3e-3"],
        "lora": ["optim.lr=5e-2", "train.lora.rank=16", "train.lora.alpha=32"],
    }[method]
    better = {"full": 0.8, "lora": 0.95}[method]
    overrides = [
        *FAST,
        *METHODS[method],
        *FAMILIES[family],
        "data=imagefolder",
        f"data.path={folder}",
        "train.random_flip=false",
    ]
    cfg = make_cfg([*overrides, *settings, "train.max_steps=15", "train.batch_size=1"])
    comps = load_components(cfg.model, cfg.cache_root)
    assert comps.family.name == family
    images = TrainImages(load_captioned_images(folder), comps.family.tokenizers(comps), 64, True, False)
    batch = collate([images[(0, 0)]] * 4)

    def fixed_loss(unet) -> float:
        with torch.no_grad():
            gen = step_generator(123, 0, 0)
            latents = encode_latents(comps.vae, batch["pixel_values"], gen)
            cond = conditioning(comps, batch, "cpu")
            return diffusion_loss(unet, objective, latents, cond, gen).item()

    objective = comps.family.objective(comps.noise_scheduler)
    before = fixed_loss(comps.denoiser)
    result = train(cfg)
    if method == "lora":  # the base model with the exported LoRA, as a user loads it
        pipe = _base_pipeline(comps.source, family)
        pipe.load_lora_weights(str(result.model_dir))
        assert _lora_tensors(pipe.unet) == len(load_file(str(result.model_dir / LORA_FILE)))
        after = fixed_loss(pipe.unet)
    else:
        after = fixed_loss(_base_pipeline(result.model_dir, family).unet)
    assert after < better * before, (before, after)


@pytest.mark.slow
@each_combination
def test_preempted_run_resumes_to_bitwise_identical_trainable_weights(make_cfg, tmp_path, method, family):
    """Stopped at step 2 of 4 (accumulating 2 micro-steps, EMA on), resumed: the trained weights, their
    EMA and the losses are bit for bit those of a run that was never stopped. LoRA with dropout, whose
    masks come from the global random stream, and adapters on every text encoder (SDXL: both)."""
    extra = ["train.lora.dropout=0.1", "train.lora.text_encoder_lr=1e-4"] if method == "lora" else []
    overrides = [
        *FAST,
        *METHODS[method],
        *FAMILIES[family],
        *extra,
        "train.max_steps=4",
        "train.grad_accum=2",
    ]
    overrides += ["train.use_ema=true", "optim.lr_schedule=cosine", "optim.lr=1e-3"]
    straight = train(make_cfg([*overrides, f"output_root={tmp_path / 'a'}"]))

    cfg = make_cfg([*overrides, f"output_root={tmp_path / 'b'}"])
    with stop_at(lambda step: step == 2):
        first = train(cfg)
    assert first.interrupted and first.step == 2
    torch.rand(7)  # the resumed process's global stream is wherever it is; nothing may depend on it
    second = train(cfg)
    assert second.step == 4 and not second.interrupted

    a, b = _trained_tensors(straight), _trained_tensors(second)
    assert a.keys() == b.keys() and any(k.startswith("ema.safetensors:") for k in a)
    if method == "lora":  # an adapter file per text encoder: model_1 (and SDXL's model_2)
        files = {k.split(":")[0] for k in a}
        assert ("model_2.safetensors" in files) == (family == "sdxl") and "model_1.safetensors" in files
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert second.losses == [pair for pair in straight.losses if pair[0] > 2]


@pytest.mark.slow
@each_combination
def test_latent_cache_follows_the_loss_curve_of_encoding_every_step(make_cfg, tmp_path, method, family):
    base = [*FAST, *METHODS[method], *FAMILIES[family], "train.max_steps=4", "train.batch_size=2"]
    base += ["optim.lr=1e-3"]
    from sdcluster.data.latent_cache import CACHE_VERSION, make_plan, verify
    from sdcluster.data.loader import training_rows
    from sdcluster.models.load import load_components

    plain = train(make_cfg([*base, "data.cache=false", f"output_root={tmp_path / 'plain'}"]))
    cfg = make_cfg([*base, f"output_root={tmp_path / 'cached'}"])
    cached = train(cfg)
    # the entry this run trained from: the family's own arrays (SDXL: both encoders' states and the pooled)
    plan = make_plan(cfg, training_rows(cfg), load_components(cfg.model, cfg.cache_root))
    assert plan.text_arrays == {"sd1": ("text",), "sdxl": ("text", "pooled")}[family]
    assert verify(paths.latent_cache_dir(cfg) / plan.key, plan.key, CACHE_VERSION) is None
    assert [s for s, _ in plain.losses] == [s for s, _ in cached.losses] == [1, 2, 3, 4]
    expected = [loss for _, loss in plain.losses]
    assert np.allclose([loss for _, loss in cached.losses], expected, rtol=1e-5, atol=0)


@pytest.mark.slow
@each_combination
def test_same_seed_same_image_at_any_batch_size(make_cfg, method, family):
    """Generation after the run (its export, or the base model with its LoRA): each image is its seed's,
    whether made in a batch of 3 or alone, within the bound docs/reference/generation.md states for a
    batch of another size."""
    from sdcluster.generate.job import generate_images
    from tests.generate.test_generate import assert_same_images_at_another_batch_size, images

    run = [*FAST, *METHODS[method], *FAMILIES[family], "train.max_steps=2", "optim.lr=5e-2"]
    quick = ["generate.num_images=3", "generate.steps=2", "generate.height=64", "generate.width=64"]
    train(make_cfg(run))
    out = generate_images(make_cfg([*run, *quick, "generate.batch_size=3"])).out_dir
    batched = out.rename(out.with_name("batched"))  # batch size is not part of the folder's name
    alone = generate_images(make_cfg([*run, *quick, "generate.batch_size=1"])).out_dir
    assert alone == out
    assert len(images(alone)) == 3 * len(make_cfg(run).generate.prompts)
    assert_same_images_at_another_batch_size(batched, alone)


@pytest.mark.slow
def test_lora_checkpoint_is_a_small_fraction_of_a_full_one(make_cfg, tmp_path):
    """Adapters, their optimizer moments and their EMA only: not the UNet's weights."""
    common = [*FAST, "train.max_steps=1", "train.use_ema=true"]
    full = train(make_cfg([*common, f"output_root={tmp_path / 'full'}"]))
    lora = train(make_cfg([*common, *LORA, f"output_root={tmp_path / 'lora'}"]))

    def size(result: TrainResult) -> int:
        return sum(p.stat().st_size for p in _checkpoint(result).rglob("*") if p.is_file())

    assert size(lora) < 0.2 * size(full), (size(lora), size(full))
    names = load_file(str(_checkpoint(lora) / "model.safetensors")).keys()
    assert names and all("lora_" in name for name in names)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_loads_with_plain_diffusers_and_gives_the_trained_adapters(make_cfg, family):
    """``load_lora_weights(export)`` on the plain base pipeline loads every adapter tensor (UNet and each
    text encoder), gives other images than the base model and the same as the trained adapters put on by
    hand; the fused export gives them too."""
    from peft import LoraConfig

    from sdcluster.models.load import resolve_model_path

    run = [
        *FAST,
        *LORA,
        *FAMILIES[family],
        "train.max_steps=3",
        "optim.lr=5e-2",
        "train.lora.fuse_export=true",
    ]
    cfg = make_cfg([*run, "train.lora.text_encoder_lr=5e-2"])
    result = train(cfg)
    assert result.model_dir == paths.run_paths(cfg).lora
    assert (result.model_dir / LORA_FILE).is_file()
    base_model = resolve_model_path(cfg.model, cfg.cache_root)

    base = _pixels(_base_pipeline(base_model, family))
    loaded = _base_pipeline(base_model, family)
    loaded.load_lora_weights(str(result.model_dir))
    encoders = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    counts = [_lora_tensors(getattr(loaded, part)) for part in ["unet", *encoders]]
    assert sum(counts) == len(load_file(str(result.model_dir / LORA_FILE))) and all(counts), counts
    with_lora = _pixels(loaded)

    by_hand = _base_pipeline(base_model, family)  # the checkpoint's adapter tensors, in peft's own names
    lora = cfg.train.lora
    adapter = LoraConfig(r=lora.rank, lora_alpha=lora.rank, target_modules=list(lora.target_modules))
    by_hand.unet.add_adapter(adapter)
    text_adapter = LoraConfig(
        r=lora.rank, lora_alpha=lora.rank, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]
    )
    for index, part in enumerate(encoders, start=1):
        from peft import inject_adapter_in_model

        inject_adapter_in_model(text_adapter, getattr(by_hand, part))
        weights = load_file(str(_checkpoint(result) / f"model_{index}.safetensors"))
        missing, unexpected = getattr(by_hand, part).load_state_dict(weights, strict=False)
        assert not unexpected and not [m for m in missing if "lora_" in m]
    trained = load_file(str(_checkpoint(result) / "model.safetensors"))
    missing, unexpected = by_hand.unet.load_state_dict(trained, strict=False)
    assert not unexpected and not [m for m in missing if "lora_" in m]

    assert np.abs(with_lora - base).max() > 1
    assert np.array_equal(with_lora, _pixels(by_hand))
    fused = _pixels(_base_pipeline(paths.run_paths(cfg).model, family))
    assert np.abs(fused - with_lora).max() <= 1  # fusing rounds differently, at most a level


@pytest.mark.slow
def test_generation_after_a_lora_run_uses_its_adapters(make_cfg, tiny_model):
    from sdcluster.generate.job import generate_images

    quick = ["generate.num_images=1", "generate.steps=2", "generate.height=64", "generate.width=64"]
    cfg = make_cfg([*FAST, *LORA, *quick, "train.max_steps=2", "optim.lr=5e-2"])
    train(cfg)
    out = generate_images(cfg).out_dir
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {(r["model"], r["lora"], r["lora_scale"]) for r in records} == {
        ("tiny", str(paths.run_paths(cfg).lora), 1.0)
    }
    off = make_cfg([*FAST, *LORA, *quick, "train.max_steps=2", "optim.lr=5e-2", "generate.lora_scale=0"])
    out_off = generate_images(off).out_dir
    assert out_off != out
    plain = make_cfg([*quick, f"generate.model={tiny_model}"])
    out_plain = generate_images(plain).out_dir
    first = records[0]["file"]

    def pixels(folder: Path) -> np.ndarray:
        from PIL import Image

        return np.asarray(Image.open(folder / first), dtype=np.float32)

    assert np.array_equal(pixels(out_off), pixels(out_plain))  # scale 0: the base model itself
    assert np.abs(pixels(out) - pixels(out_plain)).max() > 1


def test_the_lora_recipe_composes_and_is_its_own_run():
    cfg = compose(["experiment=jeans_sd14_lora", "data=imagefolder", "data.path=/tmp"])
    assert (cfg.train.method, cfg.train.lora.rank, cfg.optim.lr, cfg.train.resolution) == (
        "lora",
        8,
        1e-4,
        512,
    )
    assert cfg.model.name == "sd14" and paths.generation_model(cfg) == cfg.model.path
    full = compose(["experiment=jeans_sd14", "data=imagefolder", "data.path=/tmp"])
    assert paths.run_dir(cfg) != paths.run_dir(full)


def test_a_lora_scale_without_a_lora_is_refused():
    from sdcluster.config import check_config

    with pytest.raises(ConfigError, match=r"generate\.lora_scale: there is no LoRA to scale"):
        check_config(compose(["generate.lora_scale=0.5"]))
    check_config(compose([*LORA, "generate.lora_scale=0.5"]))  # the run's own LoRA, at half strength


def test_the_sdxl_recipe_composes_and_is_its_own_run():
    cfg = compose(["experiment=jeans_sdxl_lora", "data=imagefolder", "data.path=/tmp"])
    assert (cfg.model.path, cfg.model.variant) == ("stabilityai/stable-diffusion-xl-base-1.0", "fp16")
    assert (cfg.train.method, cfg.train.lora.rank, cfg.optim.lr, cfg.train.resolution) == (
        "lora",
        4,
        1e-4,
        1024,
    )
    assert (cfg.generate.height, cfg.generate.width) == (1024, 1024)
    sd14 = compose(["experiment=jeans_sd14_lora", "data=imagefolder", "data.path=/tmp"])
    assert paths.run_dir(cfg) != paths.run_dir(sd14)


@pytest.mark.parametrize(
    ("experiment", "repo", "timesteps", "guidance"),
    [
        ("jeans_sd35_lora", "stabilityai/stable-diffusion-3.5-medium", "logit_normal", 7.0),
        ("jeans_flux_lora", "black-forest-labs/FLUX.1-dev", "none", 3.5),
    ],
)
def test_the_flow_matching_recipes_are_the_reference_scripts_defaults(experiment, repo, timesteps, guidance):
    """diffusers' train_dreambooth_lora_sd3.py / _flux.py: rank 4, lr 1e-4 constant, 512 px, batch 1 x 4,
    bf16; SD3 draws logit-normal timesteps, FLUX uniform ones with guidance 3.5. Accepted by the launch's
    checks (512 px is below the families' native 1024, which the recipe says it means)."""
    from sdcluster.config import check_config

    cfg = compose([f"experiment={experiment}", "data=imagefolder", "data.path=/tmp"])
    check_config(cfg)
    assert cfg.model.path == repo
    train = cfg.train
    assert (train.method, train.lora.rank, train.resolution, train.batch_size, train.grad_accum) == (
        "lora",
        4,
        512,
        1,
        4,
    )
    assert (cfg.optim.lr, cfg.optim.lr_schedule, train.mixed_precision) == (1e-4, "constant", "bf16")
    assert cfg.model.flow_matching.timestep_sampling == timesteps
    assert (cfg.generate.guidance_scale, cfg.generate.height) == (guidance, 512)
    sdxl = compose(["experiment=jeans_sdxl_lora", "data=imagefolder", "data.path=/tmp"])
    assert paths.run_dir(cfg) != paths.run_dir(sdxl)


@pytest.mark.slow
def test_sdxl_vae_stays_float32_under_mixed_precision_unless_vae_path_names_one(
    make_cfg, tmp_path, fresh_accelerate_state
):
    """SDXL's VAE overflows in fp16: it is kept in fp32 while the text encoders follow the mixed precision;
    a VAE of ``model.vae_path`` (one made for half precision) follows it too. SD 1.x's VAE always follows."""
    from sdcluster.train.trainer import build_trainer

    half = [*FAST, *LORA, "train.mixed_precision=bf16"]
    sdxl = build_trainer(make_cfg([*half, "model=tiny_sdxl"])).comps
    encoders = sdxl.text_encoders
    assert (sdxl.vae.dtype, *(e.dtype for e in encoders.values()), sdxl.denoiser.dtype) == (
        torch.float32,
        torch.bfloat16,
        torch.bfloat16,
        torch.bfloat16,
    )
    sdxl.vae.to(torch.float32).save_pretrained(tmp_path / "vae", safe_serialization=True)
    own = build_trainer(make_cfg([*half, "model=tiny_sdxl", f"model.vae_path={tmp_path / 'vae'}"])).comps
    assert own.vae.dtype == torch.bfloat16
    assert build_trainer(make_cfg(half)).comps.vae.dtype == torch.bfloat16


def test_a_vae_path_that_holds_no_vae_is_refused_before_the_queue(tmp_path):
    """A local folder without a VAE, and a hub VAE that cannot be staged (the suite has no hub, and this
    cache never saw it): each stops the launch with the fix, naming ``model.vae_path``."""
    from sdcluster.cluster.preflight import preflight

    (tmp_path / "vae").mkdir()
    cache = f"model.cache_dir={tmp_path / 'hf'}"
    cases = {
        str(tmp_path / "vae"): r"is not a folder holding a VAE's config\.json.*Fix: ",
        "madebyollin/sdxl-vae-fp16-fix": r"the hub cannot be reached.*fetch model\.vae_path=madebyollin",
    }
    for where, problem in cases.items():
        cfg = compose(["model=tiny_sdxl", f"model.vae_path={where}", cache])
        with pytest.raises(ConfigError, match=rf"model\.vae_path: .*{problem}"):
            preflight(cfg, dry_run=True)


def test_launch_names_what_each_method_exports():
    from sdcluster.cluster.submit_and_wait import describe_outputs

    def said(overrides: list[str]) -> dict[str, str]:
        lines: list[str] = []
        describe_outputs(compose(["task=train", *overrides]), lines.append)
        return dict(line.split(":", 1) for line in lines)

    run = paths.run_paths(compose(LORA))
    assert said(LORA).keys() == {"run folder", "lora"} and said(LORA)["lora"].strip() == str(run.lora)
    assert said([*LORA, "train.lora.fuse_export=true"]).keys() == {"run folder", "lora", "model"}
    assert said([]).keys() == {"run folder", "model"}
