"""The model-family seam: the training code asks the family (and the method object) and never branches on
a family's or a method's name, so another family, with another objective, trains without touching it."""

from __future__ import annotations

import ast
import json
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import sdcluster
from sdcluster.config import ConfigError, TrainConfig
from sdcluster.config.checks import TRAIN_METHODS
from sdcluster.models import family as family_module
from sdcluster.models.embedded import ensure_tiny_model, is_complete
from sdcluster.models.family import SD1, SDXL, Family
from sdcluster.models.load import check_safetensors
from sdcluster.models.objectives import call_denoiser
from sdcluster.train.loop import train
from sdcluster.train.method import METHODS, Method
from tests.conftest import compose

PACKAGE = Path(sdcluster.__file__).parent
ASKERS = [
    "train/loop.py",
    "train/method.py",
    "train/trainer.py",
    "train/checkpointer.py",
    "train/loss.py",
    "train/validation.py",
    "train/export.py",
    "data/latent_cache.py",
    "data/latent_build.py",
    "generate/render.py",
]
"""The modules that must ask the family and the method instead of naming them."""
NAMES = {"sd1", "sdxl", "full", "lora", "StableDiffusionPipeline", "StableDiffusionXLPipeline"}


def _name_branches(source: str) -> list[str]:
    """Comparisons with a family or method name, and comparisons of anything called ``method``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        named = any(isinstance(o, ast.Constant) and o.value in NAMES for o in operands)
        method = any(isinstance(o, ast.Attribute) and o.attr == "method" for o in operands)
        if named or method:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("module", ASKERS)
def test_training_code_never_branches_on_a_family_or_method_name(module):
    assert _name_branches((PACKAGE / module).read_text()) == []


def test_the_name_check_sees_a_branch():
    """The check above is not vacuous: it sees the branches it forbids."""
    code = 'if cfg.train.method == "lora":\n    pass\nif comps.family.name != "sdxl":\n    pass\n'
    assert len(_name_branches(code)) == 2


def test_both_families_and_both_methods_implement_their_protocols():
    """Every member the loop, the cache and the export may ask for is there (no type checker runs here)."""
    families = [SD1(), SDXL()]
    assert all(isinstance(family, Family) for family in families)
    assert sorted(family.name for family in families) == ["sd1", "sdxl"]
    cfg = compose(["data.path=/datasets/sample"])
    for cls in METHODS.values():
        assert isinstance(cls(cfg, SD1()), Method)
    assert not issubclass(METHODS["lora"], METHODS["full"]), "siblings, not parent and child"


class RectifiedFlow:
    """Flow matching (rectified flow), written here only against the
    :class:`~sdcluster.models.objectives.Objective` protocol: input ``(1 - s) x + s n`` at ``s = t / T``,
    target the velocity ``n - x``."""

    num_timesteps = 1000

    def __init__(self) -> None:
        self.sampled: list[torch.Tensor] = []
        self.noised_calls = 0
        self.configured: list[object] = []

    def sample_timesteps(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        timesteps = torch.randint(0, self.num_timesteps, (batch,), generator=gen)
        self.sampled.append(timesteps)
        return timesteps

    def noised(self, latents, noise, timesteps):
        self.noised_calls += 1
        s = (timesteps.float() / self.num_timesteps).view(-1, 1, 1, 1).to(latents.dtype)
        return (1 - s) * latents + s * noise, noise - latents

    def snr_weights(self, timesteps, gamma):
        return torch.ones(len(timesteps), device=timesteps.device)

    def loss_weights(self, timesteps):
        return None  # no weighting of its own

    def configure(self, scheduler) -> None:
        self.configured.append(scheduler)  # a flow-matching sampler has no prediction_type to set

    predict = staticmethod(call_denoiser)  # the denoiser on the latents as they are (no packing)


@pytest.mark.slow
def test_another_objective_trains_through_the_unchanged_loop(make_cfg, monkeypatch):
    """A family whose objective is flow matching: the loop's steps, the min-SNR weighting and the validation
    loss all go through the family's objective, and the run trains and exports as any other. What
    ``train.prediction_type`` means is the objective's to apply: neither the trainer nor the export writes
    it into a scheduler behind the objective's back."""
    objective = RectifiedFlow()
    given: list[str | None] = []

    class FlowSD1(SD1):
        def objective(self, noise_scheduler, prediction_type=None, flow=None):
            given.append(prediction_type)
            return objective

    monkeypatch.setitem(family_module.FAMILIES, SD1.pipeline_name, FlowSD1)
    overrides = ["train.log_every=1", "train.validation_prompts=[]", "train.max_steps=2"]
    result = train(make_cfg([*overrides, "train.snr_gamma=5.0", "train.prediction_type=v_prediction"]))

    assert result.step == 2 and result.model_dir is not None
    assert given == ["v_prediction"], "the family's objective is told the configured prediction type"
    assert len(objective.configured) == 1, "the export asks the objective to configure its scheduler"
    exported = json.loads((result.model_dir / "scheduler" / "scheduler_config.json").read_text())
    assert exported["prediction_type"] == "epsilon", "the source's, untouched: the objective set nothing"
    assert len(objective.sampled) == 2  # one draw per micro-step
    training_calls = len(objective.sampled)
    assert objective.noised_calls > training_calls, "the validation loss must use the family's objective"
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in record for record in records)
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)


def test_the_schema_and_the_methods_name_the_same_methods():
    """``train.method`` is checked on the login node against :data:`TRAIN_METHODS` and run through
    :data:`METHODS`: the same names, and each agrees on whether it trains adapters (what run identity, the
    dry run and the generation model ask the schema)."""
    assert set(TRAIN_METHODS) == set(METHODS)
    for name, cls in METHODS.items():
        assert cls.name == name
        assert cls.trains_adapters == (TRAIN_METHODS[name] is not None), name
        assert TrainConfig(method=name).trains_adapters == cls.trains_adapters, name
    for block in filter(None, TRAIN_METHODS.values()):
        assert block in {f.name for f in fields(TrainConfig)}, f"train.{block} is not a schema block"


def _sdxl_copy(cache_root: Path, dest: Path) -> Path:
    """A copy of the embedded SDXL model (built once per session), whose family has two text encoders."""
    return Path(shutil.copytree(ensure_tiny_model(cache_root, "tiny_sdxl"), dest))


def test_the_weights_check_asks_the_family_which_folders_hold_weights(tmp_path, cache_root):
    """SDXL's second text encoder is one of its weighted parts: a folder without it is refused on the login
    node (it was skipped when missing), and a pipeline of no known family is refused naming the fix."""
    folder = _sdxl_copy(cache_root, tmp_path / "sdxl")
    check_safetensors(folder, "model.path")  # whole: accepted
    assert "text_encoder_2" in SDXL().weighted_parts() and SD1().weighted_parts()[0] == SD1.denoiser_name
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(ConfigError, match=r"model\.path: .*text_encoder_2 has no \.safetensors weights"):
        check_safetensors(folder, "model.path")
    assert not is_complete(folder), "an embedded copy without it is rebuilt"

    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "PixArtAlphaPipeline"}))
    with pytest.raises(
        ConfigError, match=r"generate\.model: .*PixArtAlphaPipeline.*Fix: point generate\.model"
    ):
        check_safetensors(folder, "generate.model")
