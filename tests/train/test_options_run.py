"""Training options that other tests only compose: each one runs a short CPU training and shows its effect.

Every run trains the tiny model for 2 steps on the sample data without gradient clipping (``QUICK``); the
module's ``baseline`` is that run with nothing else changed, and each test changes one option against it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdcluster.config import ConfigError
from sdcluster.paths import run_dir
from sdcluster.train.loop import TrainResult, train
from tests.conftest import compose, copy_sample

QUICK = [
    "train.max_steps=2",
    "train.batch_size=2",
    "train.log_every=1",
    "train.checkpoint_every=100",
    "train.validation_prompts=[]",
    "optim.max_grad_norm=0",  # off, so that the max_grad_norm test changes exactly one thing
]


def unet_weights(result: TrainResult) -> dict[str, torch.Tensor]:
    """The trained UNet as exported (the plain diffusers pipeline a user gets)."""
    assert result.model_dir is not None and not result.interrupted
    return load_file(str(result.model_dir / "unet" / "diffusion_pytorch_model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest difference between two sets of weights."""
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


def metrics(result: TrainResult) -> list[dict]:
    """The training-step lines of the run's metrics.jsonl (validation lines have no ``loss``)."""
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "loss" in record]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, cache_root: Path, tiny_model: Path) -> TrainResult:
    root = tmp_path_factory.mktemp("baseline")
    cfg = compose(
        [f"output_root={root / 'outputs'}", f"jobs_root={root / 'jobs'}", f"cache_root={cache_root}", *QUICK]
    )
    result = train(cfg)
    assert [step for step, _ in result.losses] == [1, 2]
    return result


@pytest.mark.slow
def test_gradient_checkpointing_recomputes_and_changes_nothing(make_cfg, baseline, monkeypatch):
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    result = train(make_cfg([*QUICK, "train.gradient_checkpointing=true"]))
    assert calls, "train.gradient_checkpointing=true never checkpointed a block"
    losses, base_losses = [loss for _, loss in result.losses], [loss for _, loss in baseline.losses]
    assert losses == pytest.approx(base_losses, rel=1e-6, abs=1e-7)
    ckpt, base = unet_weights(result), unet_weights(baseline)
    assert ckpt.keys() == base.keys()
    for name in base:
        torch.testing.assert_close(ckpt[name], base[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_bf16_trains_on_cpu_close_to_fp32(make_cfg, baseline, fresh_accelerate_state):
    result = train(make_cfg([*QUICK, "train.mixed_precision=bf16"]))
    assert result.step == 2 and result.model_dir is not None
    (step, loss), (base_step, base_loss) = result.losses[0], baseline.losses[0]
    assert step == base_step == 1
    assert loss != base_loss  # bf16 autocast really ran: the numbers are rounded differently ...
    assert loss == pytest.approx(base_loss, rel=0.05)  # ... and stay close to fp32's
    weights = unet_weights(result)
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
    for frozen in ("vae", "text_encoder"):  # exported as published, not as the training process cast them
        (file,) = (result.model_dir / frozen).glob("*.safetensors")
        assert {t.dtype for t in load_file(str(file)).values()} == {torch.float32}, frozen


def test_fp16_on_cpu_is_refused_before_anything_is_written(make_cfg, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = make_cfg([*QUICK, "train.mixed_precision=fp16"])
    with pytest.raises(ConfigError, match=r"(?s)fp16.*GPU"):
        train(cfg)
    assert not run_dir(cfg).exists()


def test_diffusion_target_is_the_velocity_under_v_prediction(tiny_model):
    from diffusers import DDPMScheduler

    from sdcluster.models.objectives import diffusion_target

    scheduler = DDPMScheduler.from_pretrained(tiny_model, subfolder="scheduler")
    scheduler.register_to_config(prediction_type="v_prediction")
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    timesteps = torch.tensor([10, 500, 990])
    target = diffusion_target(scheduler, latents, noise, timesteps)
    assert torch.equal(target, scheduler.get_velocity(latents, noise, timesteps))
    assert not torch.allclose(target, noise, atol=1e-3)
    scheduler.register_to_config(prediction_type="epsilon")
    assert torch.equal(diffusion_target(scheduler, latents, noise, timesteps), noise)


@pytest.mark.slow
def test_v_prediction_trains_on_the_velocity_and_exports_it(make_cfg, baseline, monkeypatch):
    from sdcluster.models import objectives as loss_module  # where NoisePrediction finds its target

    targets = []
    real = loss_module.diffusion_target

    def spy(scheduler, latents, noise, timesteps):
        target = real(scheduler, latents, noise, timesteps)
        velocity = scheduler.get_velocity(latents, noise, timesteps)
        targets.append((scheduler.config.prediction_type, torch.equal(target, velocity)))
        return target

    monkeypatch.setattr(loss_module, "diffusion_target", spy)
    result = train(make_cfg([*QUICK, "train.prediction_type=v_prediction"]))
    assert targets and all(t == ("v_prediction", True) for t in targets), targets  # every training step
    assert result.losses[0][1] != baseline.losses[0][1]  # another target, another loss
    config = json.loads((result.model_dir / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction"
    baseline_config = json.loads((baseline.model_dir / "scheduler" / "scheduler_config.json").read_text())
    assert baseline_config["prediction_type"] == "epsilon"


@pytest.mark.slow
def test_scale_lr_multiplies_by_the_effective_batch(make_cfg, baseline):
    # batch 2 x accumulation 3 x 1 process: the logged (and used) learning rate is 6 x optim.lr
    overrides = [*QUICK, "train.max_steps=1", "train.grad_accum=3", "optim.lr=1e-4", "optim.scale_lr=true"]
    result = train(make_cfg(overrides))
    assert [(r["step"], r["lr"]) for r in metrics(result)] == [(1, pytest.approx(6e-4, rel=1e-9))]
    assert [r["lr"] for r in metrics(baseline)] == [pytest.approx(1e-4, rel=1e-9)] * 2  # unscaled


def test_betas_weight_decay_eps_and_lr_reach_the_optimizer(make_cfg):
    from sdcluster.train.trainer import build_trainer

    cfg = make_cfg(
        [*QUICK, "optim.betas=[0.8,0.95]", "optim.weight_decay=0.123", "optim.eps=1e-6", "optim.lr=3e-5"]
    )
    t = build_trainer(cfg)
    optimizer = getattr(t.optimizer, "optimizer", t.optimizer)  # accelerate's wrapper holds the real one
    assert isinstance(optimizer, torch.optim.AdamW)
    assert len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert tuple(group["betas"]) == (0.8, 0.95)
    assert group["weight_decay"] == 0.123
    assert group["eps"] == 1e-6
    assert group["lr"] == 3e-5
    trainable = {id(p) for p in t.denoiser.parameters()}
    assert {id(p) for p in group["params"]} == trainable  # the whole UNet, nothing else


def mean_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The mean absolute difference over every weight."""
    total = sum((a[name] - b[name]).abs().sum().item() for name in a)
    return total / sum(t.numel() for t in a.values())


@pytest.mark.slow
def test_max_grad_norm_clips(make_cfg, baseline, tiny_model):
    clipped = unet_weights(train(make_cfg([*QUICK, "optim.max_grad_norm=1e-6"])))
    base = unet_weights(baseline)
    start = load_file(str(tiny_model / "unet" / "diffusion_pytorch_model.safetensors"))
    assert changed(clipped, base) > 1e-6
    # Gradients clipped to a total norm of 1e-6 fall below AdamW's eps, so the steps are much smaller.
    assert mean_change(clipped, start) < 0.5 * mean_change(base, start)


def _sample_with_caption_key(dest: Path, key: str) -> Path:
    """A copy of the shipped sample whose metadata.jsonl has the captions under ``key`` instead of text."""
    return copy_sample(dest, row=lambda row: {"file_name": row["file_name"], key: row["text"]})


@pytest.mark.slow
def test_caption_column_reads_captions_under_another_key(make_cfg, baseline, tmp_path):
    folder = _sample_with_caption_key(tmp_path / "captioned", "caption")
    data = ["data=imagefolder", f"data.path={folder}", "data.holdout=2"]  # the sample's own holdout
    with pytest.raises(
        ValueError, match=r'no "text" key \(it has file_name, caption\).*data\.caption_column'
    ):
        train(make_cfg([*QUICK, *data, f"output_root={tmp_path / 'wrong'}"]))
    result = train(make_cfg([*QUICK, *data, "data.caption_column=caption"]))
    # The same images and captions as the sample, only under another key: the same training, bit for bit.
    assert result.losses == baseline.losses
    assert_same_weights(unet_weights(result), unet_weights(baseline))


@pytest.mark.slow
def test_one_loader_worker_trains_the_same_weights(make_cfg, baseline, monkeypatch):
    from sdcluster.data import loader

    loaders = []
    real = loader.make_loader

    def spy(*args, **kwargs):
        loaders.append(real(*args, **kwargs))
        return loaders[-1]

    monkeypatch.setattr(loader, "make_loader", spy)
    result = train(make_cfg([*QUICK, "data.num_workers=1"]))
    assert [dl.num_workers for dl in loaders] == [1]
    assert result.losses == baseline.losses
    assert_same_weights(unet_weights(result), unet_weights(baseline))


@pytest.mark.slow
def test_model_path_folder_trains_like_model_tiny(make_cfg, baseline, tiny_model):
    result = train(make_cfg([*QUICK, f"model.path={tiny_model}"]))
    assert result.run_dir != baseline.run_dir  # another source, another run
    assert result.losses == baseline.losses
    assert_same_weights(unet_weights(result), unet_weights(baseline))


def test_model_path_is_where_the_weights_come_from(make_cfg, baseline):
    from sdcluster.train.trainer import build_trainer

    t = build_trainer(make_cfg([*QUICK, f"model.path={baseline.model_dir}"]))
    assert t.comps.source == str(baseline.model_dir)
    loaded = {name: p.detach() for name, p in t.denoiser.named_parameters()}
    assert_same_weights(loaded, unet_weights(baseline))  # the fine-tuned weights, not tiny's
