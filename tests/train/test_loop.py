"""Training: it learns, it exports a plain diffusers pipeline, and an interrupted run resumes exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdcluster.config import ConfigError
from sdcluster.paths import sample_data_dir
from sdcluster.runtime.step_events import stop_at
from sdcluster.train import step_folders
from sdcluster.train.loop import train

FAST = ["train.log_every=1", "train.checkpoint_every=100", "train.batch_size=2"]


def _final_weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    newest = step_folders.complete_checkpoints(run_dir / "checkpoints")[0]
    out = {"unet": load_file(str(newest / "model.safetensors"))}
    if (newest / "ema.safetensors").is_file():
        out["ema"] = load_file(str(newest / "ema.safetensors"))
    return out


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for group in a:
        assert a[group].keys() == b[group].keys()
        for name in a[group]:
            assert torch.equal(a[group][name], b[group][name]), f"{group}.{name} differs"


def _one_image_folder(tmp_path: Path) -> Path:
    src = sample_data_dir()
    first = json.loads((src / "metadata.jsonl").read_text().splitlines()[0])
    dest = tmp_path / "one"
    dest.mkdir()
    shutil.copy(src / first["file_name"], dest / first["file_name"])
    (dest / "metadata.jsonl").write_text(json.dumps(first) + "\n")
    return dest


@pytest.mark.slow
def test_loss_goes_down_on_one_batch(make_cfg, tmp_path):
    """A fixed (image, noise, timestep) evaluation gets better after training on that image alone."""
    from sdcluster.models.load import load_components
    from sdcluster.train.loss import conditioning, diffusion_loss, encode_latents, step_generator

    folder = _one_image_folder(tmp_path)
    overrides = [*FAST, "data=imagefolder", f"data.path={folder}", "train.random_flip=false"]
    cfg = make_cfg([*overrides, "train.max_steps=30", "optim.lr=2e-3", "train.batch_size=1"])

    def fixed_loss(unet_source: str | None) -> float:
        comps = load_components(cfg.model, cfg.cache_root)
        if unet_source:
            from diffusers import UNet2DConditionModel

            comps.denoiser = UNet2DConditionModel.from_pretrained(unet_source, subfolder="unet")
        from sdcluster.data.dataset import TrainImages, collate, load_captioned_images

        images = TrainImages(load_captioned_images(folder), comps.tokenizers["tokenizer"], 64, True, False)
        batch = collate([images[(0, 0)]] * 4)
        with torch.no_grad():
            gen = step_generator(123, 0, 0)
            latents = encode_latents(comps.vae, batch["pixel_values"], gen)
            cond = conditioning(comps, batch, "cpu")
            objective = comps.family.objective(comps.noise_scheduler)
            return diffusion_loss(comps.denoiser, objective, latents, cond, gen).item()

    before = fixed_loss(None)
    result = train(cfg)
    after = fixed_loss(str(result.model_dir))
    assert after < 0.8 * before, (before, after)


@pytest.mark.slow
def test_export_loads_with_plain_diffusers(make_cfg):
    from diffusers import StableDiffusionPipeline

    result = train(make_cfg([*FAST, "train.max_steps=2", "train.use_ema=true"]))
    pipe = StableDiffusionPipeline.from_pretrained(result.model_dir)
    image = pipe("jeans", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    assert (result.model_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(result.model_dir.rglob("*.bin")), "export must be safetensors only"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stop", "extra"),
    [
        (3, ["train.grad_accum=1"]),
        (3, ["train.grad_accum=3", "train.use_ema=true", "train.snr_gamma=5.0", "train.noise_offset=0.05"]),
    ],
    ids=["plain", "accumulation-ema-snr"],
)
def test_interrupted_run_resumes_bitwise(make_cfg, tmp_path, stop, extra):
    """Stop at step k (a preemption's collective save), resume, and end where an uninterrupted run ends."""
    overrides = [*FAST, "train.max_steps=6", "optim.lr_schedule=cosine", "optim.warmup_steps=2", *extra]
    straight = train(make_cfg([*overrides, f"output_root={tmp_path / 'a'}"]))

    cfg = make_cfg([*overrides, f"output_root={tmp_path / 'b'}"])
    with stop_at(lambda step: step == stop):
        first = train(cfg)
    assert first.interrupted and first.step == stop
    assert [s for s, _ in first.losses] == list(range(1, stop + 1))
    second = train(cfg)
    assert not second.interrupted and second.step == 6

    _assert_bitwise_equal(_final_weights(straight.run_dir), _final_weights(second.run_dir))
    assert second.losses == [pair for pair in straight.losses if pair[0] > stop]
    meta = step_folders.read_meta(step_folders.complete_checkpoints(second.run_dir / "checkpoints")[0])
    assert (meta.step, meta.world_size) == (6, 1)


def test_same_command_same_run_folder_new_hyperparameter_new_folder(make_cfg):
    a = make_cfg(["optim.lr=1e-5"])
    from sdcluster.paths import run_dir

    assert run_dir(a) == run_dir(make_cfg(["optim.lr=1e-5", "train.log_every=3"]))
    assert run_dir(a) != run_dir(make_cfg(["optim.lr=5e-6"]))


@pytest.mark.slow
def test_resume_refuses_changed_batch_unless_allowed(make_cfg, tmp_path):
    cfg = make_cfg([*FAST, "train.max_steps=2"])
    first = train(cfg)
    ckpt = step_folders.complete_checkpoints(first.run_dir / "checkpoints")[0]
    changed = [*FAST, "train.max_steps=4", "train.batch_size=1", f"train.resume={ckpt}"]
    with pytest.raises(ConfigError, match=r"train\.batch_size 2 -> 1"):
        train(make_cfg([*changed, f"output_root={tmp_path / 'c'}"]))
    allowed = train(make_cfg([*changed, f"output_root={tmp_path / 'd'}", "train.allow_resume_change=true"]))
    assert allowed.step == 4
    # 2 steps x 2 samples consumed -> the batch-1 run continues at sample 4, i.e. micro-step 4
    meta = step_folders.read_meta(step_folders.complete_checkpoints(allowed.run_dir / "checkpoints")[0])
    assert meta.micro_step == 4 + 2


@pytest.mark.slow
def test_missing_resume_target_is_an_error(make_cfg, tmp_path):
    cfg = make_cfg([*FAST, f"train.resume={tmp_path / 'nope' / 'step-00000005'}"])
    with pytest.raises(ConfigError, match="does not exist"):
        train(cfg)


@pytest.mark.slow
def test_starting_over_sets_the_earlier_run_aside(make_cfg, caplog):
    """train.resume=never in a folder with a finished run: its files move to previous/, nothing is mixed."""
    quick = [*FAST, "train.max_steps=2", "train.validation_steps=1", "train.tracker=tensorboard"]
    first = train(make_cfg(quick))
    before = sorted(p.name for p in first.run_dir.iterdir())
    files = {"checkpoints", "config.yaml", "metrics.jsonl", "model", "tensorboard", "validation"}
    assert files <= set(before)
    assert "max_steps: 2" in (first.run_dir / "config.yaml").read_text(), "the run folder holds its config"

    with caplog.at_level("WARNING", logger="sdcluster"):
        again = train(make_cfg([*quick, "train.resume=never"]))
    assert again.run_dir == first.run_dir and again.step == 2
    (previous,) = (again.run_dir / "previous").iterdir()
    assert sorted(p.name for p in previous.iterdir()) == before
    assert f"moved an earlier run's {', '.join(before)} to {previous}" in caplog.text
    records = [json.loads(line) for line in (again.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "val_loss" in r) for r in records] == [(1, False), (2, False), (2, True)]
    assert sorted(p.name for p in (again.run_dir / "checkpoints").iterdir()) == ["latest", "step-00000002"]
    assert len(list((again.run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
