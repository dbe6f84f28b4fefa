"""``train.export_formats=[diffusers,kohya]``: a LoRA export also holds ``<run>_kohya.safetensors``, in
kohya's key names, that gives the same model as diffusers' own file.

The adapters are put on the tiny models by hand (random, non-zero, alpha != rank, text encoders included)
and exported by the export itself, in a run folder whose ``config.yaml`` asks for kohya. The expectation is
diffusers' own file: both files are loaded with diffusers' ``load_lora_weights`` (which reads kohya keys)
onto fresh copies of the base model, fused, and every weight compared bit for bit. Both files hold the
same float32 tensors and diffusers fuses ``W + scale * B @ A`` with scale = alpha / rank from either, so
nothing may differ, not even in the last bit; a dropped alpha (written as the rank) would differ by 4x.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sdcluster.config import ConfigError
from sdcluster.config.export_formats import EXPORT_FORMATS
from sdcluster.config.generate import LORA_WEIGHTS
from sdcluster.identity import config_hash
from sdcluster.models.family import family_of_folder
from sdcluster.models.lora import lora_file
from sdcluster.paths import RunPaths
from sdcluster.redaction import config_yaml
from sdcluster.train.export import export_lora
from sdcluster.train.lora_formats import KOHYA_SUFFIX, WRITERS

RANK, ALPHA = 4, 16.0
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
ENCODERS = {"tiny": ["text_encoder"], "tiny_sdxl": ["text_encoder", "text_encoder_2"]}
PREFIXES = {"tiny": ("lora_unet_", "lora_te_"), "tiny_sdxl": ("lora_unet_", "lora_te1_", "lora_te2_")}


def _pipeline(source: Path):
    family = family_of_folder(source)
    pipe = family.pipeline_class.from_pretrained(str(source), **family.pipeline_kwargs())
    pipe.set_progress_bar_config(disable=True)
    return family, pipe


def _adapted(source: Path, model: str, text_encoders: bool):
    """The base pipeline with random, non-zero adapters at ``ALPHA`` (peft, as training adds them)."""
    from peft import LoraConfig, inject_adapter_in_model

    family, pipe = _pipeline(source)

    def config(targets: list[str]) -> LoraConfig:
        return LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False, target_modules=targets)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe.unet.add_adapter(config(UNET_TARGETS))
        encoders = {name: getattr(pipe, name) for name in ENCODERS[model]} if text_encoders else {}
        for encoder in encoders.values():
            inject_adapter_in_model(config(TEXT_TARGETS), encoder)
    return family, pipe, encoders


def _export(make_cfg, model: str, text_encoders: bool) -> tuple[Path, Path]:
    """Export hand-made adapters into a run folder whose config asks for kohya; (lora folder, source)."""
    from sdcluster.models.load import resolve_model_path

    overrides = [f"model={model}", "train.method=lora", "train.export_formats=[diffusers,kohya]"]
    cfg = make_cfg([*overrides, f"train.lora.alpha={ALPHA}", f"train.lora.rank={RANK}"])
    source = Path(resolve_model_path(cfg.model, cfg.cache_root))
    run = RunPaths(Path(cfg.output_root) / "runs" / "tiny-lora")
    run.root.mkdir(parents=True)
    run.config.write_text(config_yaml(cfg))
    family, pipe, encoders = _adapted(source, model, text_encoders)
    return export_lora(run.lora, family, pipe.unet, encoders, None, []), source


def _fused(source: Path, folder: Path, weight_name: str) -> dict[str, torch.Tensor]:
    """Every weight of denoiser and text encoders after loading ``weight_name`` and fusing it at scale 1."""
    _, pipe = _pipeline(source)
    pipe.load_lora_weights(str(folder), weight_name=weight_name)
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    return _weights(pipe)


def _weights(pipe) -> dict[str, torch.Tensor]:
    found = {}
    for part in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, part, None)
        if module is not None:
            found |= {f"{part}.{k}": v.detach().clone() for k, v in module.state_dict().items()}
    return found


@pytest.mark.parametrize(
    ("model", "text_encoders"), [("tiny", True), ("tiny", False), ("tiny_sdxl", True)], ids=str
)
def test_kohya_file_fuses_to_the_weights_of_the_diffusers_file(make_cfg, model, text_encoders):
    folder, source = _export(make_cfg, model, text_encoders)
    kohya = folder / f"tiny-lora{KOHYA_SUFFIX}"
    assert kohya.is_file() and (folder / LORA_WEIGHTS).is_file()

    expected = _fused(source, folder, LORA_WEIGHTS)
    got = _fused(source, folder, kohya.name)
    base = _weights(_pipeline(source)[1])
    changed = {name.split(".")[0] for name in base if not torch.equal(base[name], expected[name])}
    assert changed == {"unet", *(ENCODERS[model] if text_encoders else [])}  # the adapters act everywhere
    assert got.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert not different, different[:5]


def test_kohya_keys_are_the_names_other_tools_read(make_cfg):
    folder, _ = _export(make_cfg, "tiny", True)
    with safe_open(str(folder / f"tiny-lora{KOHYA_SUFFIX}"), framework="pt") as fh:
        keys = set(fh.keys())
        alphas = {k: float(fh.get_tensor(k)) for k in keys if k.endswith(".alpha")}
        metadata = fh.metadata()
    assert {k.split("_")[0] + "_" + k.split("_")[1] + "_" for k in keys} == set(PREFIXES["tiny"])
    downs = {k.removesuffix(".lora_down.weight") for k in keys if k.endswith(".lora_down.weight")}
    assert downs == {k.removesuffix(".alpha") for k in alphas}  # one alpha per adapted module
    assert set(alphas.values()) == {ALPHA}  # the trained alpha, not the rank
    # CLIP's module names as every kohya reader has them (transformers 5 dropped `text_model.`)
    text = [k for k in downs if k.startswith("lora_te_")]
    assert text and all(k.startswith("lora_te_text_model_encoder_layers_") for k in text)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in downs
    assert metadata["ss_network_dim"] == str(RANK) and float(metadata["ss_network_alpha"]) == ALPHA
    # sdcluster's generation (and load_lora_weights without a weight name) still reads diffusers' file
    assert lora_file(folder) == folder / LORA_WEIGHTS


def test_the_default_export_writes_no_kohya_file(make_cfg, tiny_model):
    cfg = make_cfg(["train.method=lora"])
    assert cfg.train.export_formats == ["diffusers"]
    run = RunPaths(Path(cfg.output_root) / "runs" / "tiny-lora")
    run.root.mkdir(parents=True)
    run.config.write_text(config_yaml(cfg))
    family, pipe, encoders = _adapted(tiny_model, "tiny", False)
    folder = export_lora(run.lora, family, pipe.unet, encoders, None, [])
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [LORA_WEIGHTS]


def test_kohya_on_a_full_fine_tune_is_refused_with_the_fix(make_cfg):
    with pytest.raises(ConfigError) as err:
        make_cfg(["train.export_formats=[diffusers,kohya]"])
    assert "train.export_formats" in str(err.value) and "train.method=lora" in str(err.value)


@pytest.mark.parametrize(
    ("formats", "words"),
    [("[diffusers,safetensor]", "use one of diffusers, kohya"), ("[kohya]", "[diffusers,kohya]")],
)
def test_unknown_or_incomplete_formats_are_refused(make_cfg, formats, words):
    with pytest.raises(ConfigError) as err:
        make_cfg(["train.method=lora", f"train.export_formats={formats}"])
    assert "train.export_formats" in str(err.value) and words in str(err.value)


def test_export_formats_do_not_change_the_run(make_cfg):
    plain = make_cfg(["train.method=lora"])
    kohya = make_cfg(["train.method=lora", "train.export_formats=[diffusers,kohya]"])
    assert config_hash(plain) == config_hash(kohya)


def test_every_lora_format_has_a_writer():
    assert set(WRITERS) == {name for name, lora_only in EXPORT_FORMATS.items() if lora_only}
