"""Validation: a loss that depends on the weights only, images from fixed seeds, EMA swapped in and out."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdcluster.data.dataset import load_captioned_images
from sdcluster.data.split import holdout_split
from sdcluster.paths import sample_data_dir
from sdcluster.runtime.step_events import stop_at
from sdcluster.train import validation
from sdcluster.train.checkpointer import Checkpointer
from sdcluster.train.loop import train
from sdcluster.train.trainer import Trainer, build_trainer

PROMPTS = "train.validation_prompts=[a pair of jeans,faded blue denim,jeans with a black marker]"
QUICK = ["train.max_steps=3", "train.validation_steps=1", "generate.guidance_scale=1.0"]


class _Rank:
    """One rank of a pretend two-process job: its own share, no collectives (each share is checked alone)."""

    def __init__(self, real: Any, index: int, world: int) -> None:
        self.real, self.process_index, self.num_processes = real, index, world
        self.is_main_process = index == 0

    def reduce(self, tensor: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return tensor.clone()

    def wait_for_everyone(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def _weights(t: Trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in t.denoiser.named_parameters()}


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, cache_root, tiny_model) -> Trainer:
    """One trainer at the model's initial weights, shared by the tests that leave it as they found it."""
    from tests.conftest import compose

    tmp = tmp_path_factory.mktemp("validation")
    roots = [f"output_root={tmp / 'outputs'}", f"jobs_root={tmp / 'jobs'}", f"cache_root={cache_root}"]
    return build_trainer(compose([*roots, *QUICK, PROMPTS]))


@pytest.fixture(scope="module")
def base_loss(base: Trainer) -> float:
    return validation.validation_loss(base)


@pytest.mark.slow
def test_loss_is_deterministic_and_ignores_train_seed(base, base_loss):
    assert validation.validation_loss(base) == base_loss
    assert base.denoiser.training
    reseeded = dataclasses.replace(base.cfg, train=dataclasses.replace(base.cfg.train, seed=7))
    assert validation.validation_loss(dataclasses.replace(base, cfg=reseeded)) == base_loss


@pytest.mark.slow
def test_loss_changes_after_training(base_loss, make_cfg):
    cfg = make_cfg([*QUICK, "optim.lr=1e-3", "train.validation_prompts=[]"])
    train(cfg)
    t = build_trainer(cfg)
    Checkpointer(t, None).load()
    assert t.step == 3
    trained = validation.validation_loss(t)
    assert abs(trained - base_loss) > 1e-4, (base_loss, trained)


@pytest.mark.slow
def test_loss_images_are_held_out(base):
    cfg, tokenizer = base.cfg, base.comps.tokenizers["tokenizer"]
    names = list(load_captioned_images(sample_data_dir())["file_name"])
    train_rows, held_rows = holdout_split(len(names), cfg.data.holdout)
    images = validation.loss_images(cfg, tokenizer)
    assert cfg.data.holdout == 2 and images.held_out
    assert images.indices == held_rows
    assert not set(images.names) & {names[i] for i in train_rows}
    assert images.pixel_values.shape == (2, 3, cfg.train.resolution, cfg.train.resolution)
    assert "2 held-out" in images.describe()

    no_holdout = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, holdout=0))
    fallback = validation.loss_images(no_holdout, tokenizer)
    assert fallback.indices == [0, 1, 2, 3] and not fallback.held_out
    assert "data.holdout=0" in fallback.describe()


@pytest.mark.slow
def test_ranks_share_the_work(base, base_loss):
    """Pair i goes to rank i % world: two ranks' shares add up to the one-rank loss; prompt 1 is rank 1's."""
    ranks = [dataclasses.replace(base, accelerator=_Rank(base.accelerator, r, 2)) for r in (0, 1)]
    shares = [validation.validation_loss(t) for t in ranks]
    assert all(share > 0 for share in shares)
    assert sum(shares) == pytest.approx(base_loss, rel=1e-12)

    folder = validation.validation_images(ranks[1], step=99)
    assert sorted(p.name for p in folder.iterdir()) == ["p01.png"]  # no grid: rank 1 is not the main one


@pytest.mark.slow
def test_run_validation_writes_images_grid_and_metrics(base, base_loss, caplog):
    with caplog.at_level(logging.INFO, logger="sdcluster"):
        result = validation.run_validation(base, step=5)
    folder = base.paths.validation / "step-00000005"
    assert result["images"] == folder and result["val_loss"] == base_loss
    assert sorted(p.name for p in folder.glob("*.png")) == ["grid.png", "p00.png", "p01.png", "p02.png"]
    with Image.open(folder / "p00.png") as image:
        assert image.size == (64, 64)
    with Image.open(folder / "grid.png") as grid:
        assert grid.size == (128, 128)  # 3 images: 2 x 2 tiles
    assert np.array_equal(_pixels(folder / "grid.png")[:64, 64:], _pixels(folder / "p01.png"))
    record = json.loads(base.paths.metrics.read_text().splitlines()[-1])
    assert record["step"] == 5 and record["val_loss"] == base_loss and "loss" not in record
    line = f"validation step 5 | val_loss {base_loss:.4f} (2 held-out images) | images {folder}"
    assert line in caplog.text
    assert base.denoiser.training


@pytest.mark.slow
def test_images_use_ema_weights_and_restore_the_unet(make_cfg):
    t = build_trainer(make_cfg([*QUICK, "train.use_ema=true", "train.validation_prompts=[a pair of jeans]"]))
    with torch.no_grad():  # make the EMA differ from the UNet, as it does after training
        for shadow in t.ema.shadow_params:
            shadow.add_(0.05 * torch.randn(shadow.shape, generator=torch.Generator().manual_seed(0)))
    before = _weights(t)
    ema = t.ema

    raw = validation.validation_images(dataclasses.replace(t, ema=None), step=1)
    with_ema = validation.validation_images(t, step=2)
    assert _same_weights(_weights(t), before) and t.denoiser.training
    with torch.no_grad():
        for param, shadow in zip(t.denoiser.parameters(), ema.shadow_params, strict=True):
            param.copy_(shadow)
    by_hand = validation.validation_images(dataclasses.replace(t, ema=None), step=3)

    assert np.array_equal(_pixels(with_ema / "p00.png"), _pixels(by_hand / "p00.png"))
    assert not np.array_equal(_pixels(with_ema / "p00.png"), _pixels(raw / "p00.png"))


def _val_steps(cfg) -> list[int]:
    metrics = Path(cfg.output_root).glob("**/metrics.jsonl")
    records = [json.loads(line) for path in metrics for line in path.read_text().splitlines()]
    return [r["step"] for r in records if "val_loss" in r]


def _final_unet(result) -> dict[str, torch.Tensor]:
    return load_file(result.model_dir / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow
def test_training_validates_on_schedule_without_changing_training(tmp_path, make_cfg):
    """Every validate_every steps and at the end, once each: straight through, across a preemption at a
    validation step and a rerun of the finished run; the weights are bitwise those of a run that never
    validated."""
    quick = ["train.max_steps=6", "train.validation_steps=1", "train.use_ema=true", "train.log_every=1"]
    validating = [*quick, "train.validate_every=2", "train.validation_prompts=[a pair of jeans]"]

    def roots(name: str) -> list[str]:
        return [f"output_root={tmp_path / name}", f"jobs_root={tmp_path / name / 'jobs'}"]

    straight_cfg = make_cfg([*validating, *roots("straight")])
    straight = train(straight_cfg)
    assert _val_steps(straight_cfg) == [2, 4, 6]  # 2 and 4 inside the loop, 6 at the end

    cfg = make_cfg([*validating, *roots("preempted")])
    with stop_at(lambda step: step == 2):
        stopped = train(cfg)
    assert stopped.interrupted and _val_steps(cfg) == []  # the save comes first, validation after resume
    resumed = train(cfg)
    assert _val_steps(cfg) == [2, 4, 6]
    assert (resumed.run_dir / "validation" / "step-00000002" / "grid.png").is_file()
    train(cfg)  # the finished run again: resumes at step 6, nothing is validated twice
    assert _val_steps(cfg) == [2, 4, 6]

    plain_cfg = make_cfg([*quick, *roots("plain"), "train.validate_every=0", "train.validation_prompts=[]"])
    plain = train(plain_cfg)
    assert _val_steps(plain_cfg) == [6]  # validate_every=0: at the end only
    assert plain.losses == straight.losses and plain.losses[2:] == resumed.losses
    for other in (straight, resumed):
        ours, theirs = _final_unet(other), _final_unet(plain)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
