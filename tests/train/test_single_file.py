"""``train.export_formats=[diffusers,single_file]``: a full fine-tune's export also holds
``<run>.safetensors``, the model in the original Stable Diffusion layout, that diffusers'
``from_single_file`` reads back.

The expectation is the exported diffusers folder itself: ``from_single_file(file, config=<that folder>)``
(offline) must give every weight of every component bit for bit (same dtype, same values), for SD 1.x, an SD
2.x-shaped model (OpenCLIP text encoder) and SDXL. The key names are compared with those of the published
SD 1.5 and SDXL base files, as recorded in ``tests/train/data/`` (see ``tests/train/ldm_keys.py`` for where
they come from and what that proves): the tiny models have fewer and smaller blocks, so what is compared is
the names with their block numbers blanked, which must be the same set both ways.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sdcluster.config import ConfigError
from sdcluster.identity import config_hash
from sdcluster.models.family import family_of_folder
from sdcluster.models.load import resolve_model_path
from sdcluster.paths import RunPaths
from sdcluster.redaction import config_yaml
from sdcluster.train.export import export_pipeline
from sdcluster.train.single_file import write_single_file
from tests.train.ldm_keys import PUBLISHED, loader_round_trip, recorded, written_state

FORMATS = "train.export_formats=[diffusers,single_file]"
PUBLISHED_OF = {"tiny": "sd15", "tiny_sdxl": "sdxl_base"}


def _pipeline_kwargs(folder: Path) -> dict:
    return family_of_folder(folder).pipeline_kwargs()


def _weights(pipe) -> dict[str, dict[str, torch.Tensor]]:
    parts = ("unet", "vae", "text_encoder", "text_encoder_2")
    return {p: getattr(pipe, p).state_dict() for p in parts if getattr(pipe, p, None) is not None}


def _round_trip(folder: Path, file: Path, dtype: torch.dtype | None = None) -> tuple[dict, dict]:
    """(the folder's weights, the single file's as ``from_single_file`` loads them with the folder's
    configs, offline)."""
    family = family_of_folder(folder)
    kw = {**family.pipeline_kwargs(), **({"dtype": dtype} if dtype else {})}
    expected = family.pipeline_class.from_pretrained(str(folder), **kw)
    loaded = family.pipeline_class.from_single_file(
        str(file), config=str(folder), local_files_only=True, **kw
    )
    return _weights(expected), _weights(loaded)


def _assert_same(expected: dict, loaded: dict, parts: tuple[str, ...] | None = None) -> None:
    for part in parts or tuple(expected):
        want, got = expected[part], loaded[part]
        assert set(got) == set(want), f"{part}: {sorted(set(got) ^ set(want))[:4]}"
        for key, tensor in want.items():
            assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), f"{part}.{key}"


def _export(make_cfg, model: str, overrides: tuple[str, ...] = (FORMATS,)) -> tuple[Path, torch.nn.Module]:
    """Export a 'trained' UNet (the base one, moved off its weights) through the export itself, in a run
    folder whose config asks for the single file; (the model folder, that UNet)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    cfg = make_cfg([f"model={model}", *overrides])
    source = resolve_model_path(cfg.model, cfg.cache_root)
    run = RunPaths(Path(cfg.output_root) / "runs" / "tiny-full")
    run.root.mkdir(parents=True)
    run.config.write_text(config_yaml(cfg))
    family = family_of_folder(Path(source))
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for param in unet.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    objective = family.objective(DDPMScheduler.from_pretrained(source, subfolder="scheduler"))
    return export_pipeline(run.model, family, source, unet, None, [], objective, cfg.model), unet


def _patterns(keys) -> set[str]:
    """Key names with every block number blanked (``input_blocks.4.1.`` -> ``input_blocks.#.#.``)."""
    return {re.sub(r"(?<=[._])\d+(?=\.)", "#", key) for key in keys}


def _keys(file: Path) -> list[str]:
    with safe_open(str(file), framework="pt") as fh:
        return list(fh.keys())


@pytest.mark.parametrize("model", ["tiny", "tiny_sdxl"])
def test_the_export_writes_one_file_that_from_single_file_reads_back(make_cfg, model):
    folder, unet = _export(make_cfg, model)
    file = folder / "tiny-full.safetensors"
    assert file.is_file()
    expected, loaded = _round_trip(folder, file)
    _assert_same({"unet": unet.state_dict()}, loaded, ("unet",))  # the trained weights, not the base's
    # diffusers tells SDXL's two text encoders apart by their widths, which the tiny SDXL shares (32 and
    # 32, where SDXL has 768 and 1280): its second one is checked on the wide model below.
    _assert_same(expected, loaded, ("unet", "vae", "text_encoder"))
    assert _patterns(_keys(file)) == _patterns(recorded(PUBLISHED_OF[model]))
    assert f"`{file.name}` is the whole model in one file" in (folder / "README.md").read_text()


@pytest.fixture
def wide_sdxl(tmp_path, cache_root) -> Path:
    """The tiny SDXL with a 48-wide second text encoder (the UNet's cross-attention 32 + 48)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    from sdcluster.models.embedded import ensure_tiny_model
    from sdcluster.models.tiny_sdxl import TINY_SDXL_UNET

    pipe = StableDiffusionXLPipeline.from_pretrained(str(ensure_tiny_model(cache_root, "tiny_sdxl")))
    config = pipe.text_encoder_2.config
    config.hidden_size = 48
    torch.manual_seed(2)
    pipe.text_encoder_2 = CLIPTextModelWithProjection(config)
    pipe.unet = UNet2DConditionModel(
        in_channels=4, out_channels=4, **{**TINY_SDXL_UNET, "cross_attention_dim": 80}
    )
    pipe.save_pretrained(tmp_path / "wide", safe_serialization=True)
    return tmp_path / "wide"


def test_sdxl_round_trips_every_component(wide_sdxl):
    file = write_single_file(wide_sdxl, "wide")
    expected, loaded = _round_trip(wide_sdxl, file)
    _assert_same(expected, loaded)
    keys = _keys(file)
    assert "conditioner.embedders.1.model.text_projection" in keys  # OpenCLIP's matrix, transposed
    assert any(k.endswith("resblocks.0.attn.in_proj_weight") for k in keys)  # q, k, v in one
    assert _patterns(keys) == _patterns(recorded("sdxl_base"))


def test_an_sd2_shaped_model_keeps_openclip_names(tmp_path, tiny_model):
    """SD 2.x's text encoder is OpenCLIP's (``gelu``): its published files name it that way."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    kw = _pipeline_kwargs(tiny_model)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), **kw)
    config = pipe.text_encoder.config
    config.hidden_act = "gelu"
    torch.manual_seed(3)
    pipe.text_encoder = CLIPTextModel(config)
    pipe.save_pretrained(tmp_path / "sd2", safe_serialization=True)
    file = write_single_file(tmp_path / "sd2", "sd2")
    keys = _keys(file)
    assert "cond_stage_model.model.token_embedding.weight" in keys
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    expected, loaded = _round_trip(tmp_path / "sd2", file)
    _assert_same(expected, loaded)


def test_fp16_halves_every_weight_and_loads(make_cfg):
    folder, _ = _export(make_cfg, "tiny", (FORMATS, "train.export_fp16=true"))
    file = folder / "tiny-full.safetensors"
    with safe_open(str(file), framework="pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()}  # noqa: SIM118 (a safe_open handle is no dict) == {torch.float16}
    expected, loaded = _round_trip(folder, file, torch.float16)  # the fp32 folder cast to fp16 on load
    _assert_same(expected, loaded)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_size_names_are_the_ones_diffusers_loader_reads(name):
    """At SD 1.5's and SDXL's published sizes (meta device): the written names are the recorded ones, and
    diffusers' loader maps them onto exactly the model's weights, none left over, none missing."""
    state = written_state(name)
    assert sorted(state) == sorted(recorded(name))
    assert all(not extra and not missing for extra, missing in loader_round_trip(name, state).values())


def test_a_lora_run_is_told_that_kohya_is_its_single_file(make_cfg):
    with pytest.raises(ConfigError) as err:
        make_cfg(["train.method=lora", FORMATS])
    assert "train.export_formats" in str(err.value) and "kohya" in str(err.value)
    assert "fuse_export" in str(err.value)
    make_cfg(["train.method=lora", "train.lora.fuse_export=true", FORMATS])  # a fused model: one file too
    with pytest.raises(ConfigError, match=r"train\.export_fp16"):
        make_cfg(["train.export_fp16=true"])  # halves nothing without the single file


def test_the_single_file_does_not_change_the_run(make_cfg):
    plain = make_cfg([])
    asked = make_cfg([FORMATS, "train.export_fp16=true"])
    assert config_hash(asked) == config_hash(plain)


def test_a_fused_lora_export_gets_its_single_file(make_cfg, tiny_model):
    """``train.lora.fuse_export=true``: the model with the LoRA fused is a whole model, so it has one."""
    from diffusers import DDPMScheduler

    from sdcluster.train.export import export_fused
    from tests.generate.test_lora_generation import write_lora

    cfg = make_cfg(["train.method=lora", "train.lora.fuse_export=true", FORMATS])
    run = RunPaths(Path(cfg.output_root) / "runs" / "tiny-lora")
    run.root.mkdir(parents=True)
    run.config.write_text(config_yaml(cfg))
    lora = write_lora(tiny_model, run.lora)
    family = family_of_folder(tiny_model)
    objective = family.objective(DDPMScheduler.from_pretrained(tiny_model, subfolder="scheduler"))
    folder = export_fused(run.model, family, str(tiny_model), lora, objective, cfg.model)
    expected, loaded = _round_trip(folder, folder / "tiny-lora.safetensors")
    _assert_same(expected, loaded)
    base = family.pipeline_class.from_pretrained(str(tiny_model), **family.pipeline_kwargs())
    assert any(not torch.equal(t, base.unet.state_dict()[k]) for k, t in loaded["unet"].items())  # fused


def test_an_export_that_does_not_ask_writes_no_single_file(make_cfg):
    folder, _ = _export(make_cfg, "tiny", ())
    assert (folder / "model_index.json").is_file() and not list(folder.glob("*.safetensors"))
