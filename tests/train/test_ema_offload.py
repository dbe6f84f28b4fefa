"""``train.ema_offload``: the EMA kept in CPU memory, updated on the parameters' device, the same average."""

from __future__ import annotations

import pytest
import torch

from sdcluster.config import ConfigError
from sdcluster.train.ema import LerpEMA


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    model[1].bias.requires_grad_(False)  # an untrained parameter is copied, not averaged
    return model


def _train(model: torch.nn.Module, emas: list[LerpEMA], steps: int = 5) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen).to(p.device))
        for ema in emas:
            ema.step(model.parameters())


def test_offload_without_ema_is_refused(make_cfg):
    with pytest.raises(ConfigError, match=r"train\.ema_offload.*Fix: set train\.use_ema=true"):
        make_cfg(["train.use_ema=false", "train.ema_offload=true"])
    cfg = make_cfg(["train.use_ema=true", "train.ema_offload=true"])
    assert cfg.train.ema_offload


def test_offload_does_not_change_the_run_folder(make_cfg):
    from sdcluster.paths import run_paths

    plain = make_cfg(["train.use_ema=true"])
    offloaded = make_cfg(["train.use_ema=true", "train.ema_offload=true"])
    assert run_paths(plain).root == run_paths(offloaded).root  # same average: a resume may switch it on


def test_offloaded_ema_on_cpu_is_the_plain_ema():
    model = _model()
    plain = LerpEMA(model.parameters(), decay=0.9, foreach=True)
    offloaded = LerpEMA(model.parameters(), decay=0.9, foreach=True, offload=True)
    _train(model, [plain, offloaded])
    assert offloaded.optimization_step == plain.optimization_step == 5
    for a, b in zip(offloaded.shadow_params, plain.shadow_params, strict=True):
        assert a.device.type == "cpu"
        assert torch.equal(a, b)
    assert torch.equal(offloaded.shadow_params[-1], model[1].bias)


@pytest.mark.gpu  # the offload moves the EMA to a GPU and back
def test_offloaded_ema_stays_pinned_on_cpu_and_matches_the_device_ema():
    model = _model().cuda()
    on_device = LerpEMA(model.parameters(), decay=0.9, foreach=True)
    offloaded = LerpEMA(model.parameters(), decay=0.9, foreach=True, offload=True)
    buffers = [s.data_ptr() for s in offloaded.shadow_params]
    _train(model, [on_device, offloaded])
    assert [s.data_ptr() for s in offloaded.shadow_params] == buffers  # updated in place
    for a, b in zip(offloaded.shadow_params, on_device.shadow_params, strict=True):
        assert a.device.type == "cpu" and a.is_pinned()
        assert torch.equal(a, b.cpu())
    offloaded.copy_to(model.parameters())  # what validation and the export do with it
    for p, s in zip(model.parameters(), offloaded.shadow_params, strict=True):
        assert p.device.type == "cuda" and torch.equal(p.cpu(), s)


@pytest.mark.slow
def test_training_with_offloaded_ema_resumes_to_the_plain_ema(make_cfg, tmp_path):
    """The option on, through the real job: stopped, resumed, it ends with the EMA a plain run has."""
    from safetensors.torch import load_file

    from sdcluster.runtime.step_events import stop_at
    from sdcluster.train import step_folders
    from sdcluster.train.checkpointer import EMA_FILE
    from sdcluster.train.loop import train

    base = ["train.max_steps=3", "train.batch_size=2", "train.use_ema=true", "train.ema_decay=0.5"]
    base += ["train.log_every=1", "train.validate_every=0", "train.validation_prompts=[]"]
    plain = train(make_cfg([*base, f"output_root={tmp_path / 'plain'}"]))
    cfg = make_cfg([*base, "train.ema_offload=true", f"output_root={tmp_path / 'offloaded'}"])
    with stop_at(lambda step: step == 2):
        assert train(cfg).interrupted
    offloaded = train(cfg)

    def final_ema(run_dir) -> dict[str, torch.Tensor]:
        newest = step_folders.complete_checkpoints(run_dir / "checkpoints")[0]
        return load_file(str(newest / EMA_FILE))

    a, b = final_ema(plain.run_dir), final_ema(offloaded.run_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert offloaded.model_dir is not None and (offloaded.model_dir / "model_index.json").is_file()
