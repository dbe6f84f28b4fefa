"""A cached run never loads its text encoders (T5-XXL, for SD 3.5 and FLUX.1): their dtypes (which the latent
cache's key holds) are known from their configs, a cache build fills the text store with what validation
encodes, and the store gives the very numbers the encoders give."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sdcluster.data import latent_array, text_store
from sdcluster.data.dataset import tokenize_captions
from sdcluster.generate.render import PromptEmbeddings, render
from sdcluster.models.embedded import ensure_tiny_model
from sdcluster.models.family import FLUX
from sdcluster.models.load import load_components, prepare_frozen
from sdcluster.train.loop import train
from tests.conftest import copy_sample

FAMILIES = ["tiny", "tiny_sdxl", "tiny_sd3", "tiny_flux"]


@pytest.mark.parametrize("model", FAMILIES)
def test_encoders_load_on_first_read_with_the_dtypes_said_before(make_cfg, model):
    """Loading the components loads no text encoder; the dtypes said before any load are the loaded ones',
    and the half type once prepared for mixed precision; a released encoder is loaded again when read."""
    cfg = make_cfg([f"model={model}"])
    comps = load_components(cfg.model, cfg.cache_root, denoiser=False)
    encoders = comps.text_encoders
    assert list(encoders) == list(comps.family.text_encoder_classes) and encoders.loaded() == {}
    said = encoders.dtypes()
    assert encoders.loaded() == {}, "knowing the dtypes loaded an encoder"
    first = next(iter(encoders))
    assert next(encoders[first].parameters()).dtype == said[first]
    assert list(encoders.loaded()) == [first], "reading one encoder loaded another"
    encoders.prepare(lambda encoder: encoder.to(dtype=torch.bfloat16), torch.bfloat16)
    assert set(encoders.dtypes().values()) == {torch.bfloat16}
    assert {next(e.parameters()).dtype for e in encoders.values()} == {torch.bfloat16}  # loaded, then cast
    assert encoders.release() == list(encoders) and encoders.loaded() == {}
    assert encoders.ever_loaded == list(encoders)


def test_an_encoder_saved_in_bf16_is_known_as_bf16_before_it_loads(make_cfg, tmp_path, tiny_model):
    """transformers 5 loads a checkpoint in its own dtype: the config says it, and is read without loading."""
    from transformers import CLIPTextModel

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.bfloat16)
    shutil.rmtree(folder / "text_encoder")
    encoder.save_pretrained(folder / "text_encoder")
    comps = load_components(make_cfg([f"model.path={folder}"]).model, tmp_path / "cache", denoiser=False)
    assert comps.text_encoders.dtype("text_encoder") == torch.bfloat16 and comps.text_encoders.loaded() == {}
    assert next(comps.text_encoders["text_encoder"].parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("model", ["tiny", "tiny_flux"])
def test_the_store_gives_the_encoders_numbers_and_the_same_validation_images(make_cfg, tmp_path, model):
    """A held-out caption's stored encodings are the encoders' to the bit, read back from the file; a
    validation prompt rendered from its stored embeddings is the image the pipeline draws from the text."""
    cfg = make_cfg([f"model={model}"])
    comps = load_components(cfg.model, cfg.cache_root)
    prepare_frozen(cfg.model, comps, torch.device("cpu"), None)
    store = text_store.TextStore(tmp_path / "store", comps, "cpu")  # a store of this test's own
    family, caption = comps.family, "faded denim laid flat"
    with torch.no_grad():
        direct = family.encode(comps, tokenize_captions(family.tokenizers(comps), [caption]), "cpu")
    first = store.caption(caption)
    again = text_store.TextStore(tmp_path / "store", comps, "cpu")
    read = again.caption(caption)
    assert store.computed == 1 and again.computed == 0, "the second store read the file"
    for kind in family.text_arrays:
        assert torch.equal(first[kind], direct[kind]) and torch.equal(read[kind], direct[kind])

    gen = cfg.generate
    gen.steps, gen.height, gen.width = 2, 64, 64
    pipe = family.pipeline(comps, comps.denoiser, comps.noise_scheduler)
    pipe.set_progress_bar_config(disable=True)
    from_text = render(pipe, ["a pair of jeans"], [7], gen)[0]

    class Stored(PromptEmbeddings):
        def encode(self, prompt, negative, guidance):
            return again.prompt(prompt, negative, guidance, lambda: pipe)

    comps.text_encoders.release()
    bare = family.pipeline(comps, comps.denoiser, comps.noise_scheduler, text=False)
    bare.set_progress_bar_config(disable=True)
    assert all(getattr(bare, name) is None for name in family.text_encoder_classes)
    from_store = render(bare, ["a pair of jeans"], [7], gen, Stored(bare, gen.negative_prompt))[0]
    assert again.computed == 1 and comps.text_encoders.loaded() == {}  # encoded once, by `pipe`
    assert np.array_equal(np.asarray(from_text), np.asarray(from_store))


def _forbid_text_encoders(monkeypatch, family) -> None:
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a text encoder was loaded")

    for cls in family.text_encoder_classes.values():
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", refuse)


def _val_loss(run_dir: Path) -> float:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["val_loss"] for r in lines if "val_loss" in r)


def _flux_run(tmp_path: Path, cache_root: Path) -> list[str]:
    """The overrides of a short tiny FLUX run with a held-out image and a validation prompt, under a cache
    root of this test's own (an empty text store) that holds a link to the shared model."""
    own, built = tmp_path / "cache", ensure_tiny_model(cache_root, "tiny_flux")
    link = own / built.relative_to(cache_root)  # the shared model where this cache root looks for it
    link.parent.mkdir(parents=True)
    link.symlink_to(built)
    data = copy_sample(tmp_path / "data", count=5)
    return [
        "model=tiny_flux",
        f"data.path={data}",
        f"cache_root={own}",
        "data.holdout=1",
        "train.max_steps=2",
        "train.log_every=1",
        "train.validation_steps=2",
        "train.validation_prompts=[a pair of jeans]",
    ]


def test_a_flux_run_on_a_cache_built_ahead_loads_no_text_encoder(make_cfg, tmp_path, cache_root, monkeypatch):
    """``task=cache`` builds the entry and fills the text store; the training job after it, with the
    held-out loss and a validation image, never loads CLIP or T5 (loading either fails the test here), and
    validates as a run that encodes every step does."""
    base = _flux_run(tmp_path, cache_root)
    own = Path(make_cfg(base).cache_root)
    cfg = make_cfg([*base, f"output_root={tmp_path / 'cached'}"])
    built = latent_array.build_piece(cfg, 0, 1)
    assert built.published
    assert len(list((own / "text").rglob("*.safetensors"))) == 2  # the held-out caption and the prompt

    with monkeypatch.context() as forbidden:
        _forbid_text_encoders(forbidden, FLUX)
        cached = train(cfg)
    assert cached.step == 2 and list(cached.run_dir.glob("validation/step-00000002/p00.png"))

    plain = train(make_cfg([*base, "data.cache=false", f"output_root={tmp_path / 'plain'}"]))
    assert _val_loss(cached.run_dir) == pytest.approx(_val_loss(plain.run_dir), rel=1e-5)


def test_a_run_that_builds_the_cache_leaves_what_the_next_run_needs(
    make_cfg, tmp_path, cache_root, monkeypatch
):
    """A run that builds the cache itself loads the encoders for it, stores what validation encodes and lets
    go of them before its first step; the next run on that cache (another learning rate) loads none."""
    base = _flux_run(tmp_path, cache_root)
    first = train(make_cfg([*base, "optim.lr=1e-4", f"output_root={tmp_path / 'first'}"]))
    assert first.step == 2
    assert len(list((Path(make_cfg(base).cache_root) / "text").rglob("*.safetensors"))) == 2

    cfg = make_cfg([*base, "optim.lr=2e-4", f"output_root={tmp_path / 'second'}"])
    with monkeypatch.context() as forbidden:
        _forbid_text_encoders(forbidden, FLUX)
        second = train(cfg)
    assert second.step == 2 and _val_loss(second.run_dir) != _val_loss(first.run_dir)


def test_a_full_export_copies_the_encoders_files_a_plain_load_reads(tmp_path):
    """Copied, not loaded: the config and the safetensors weights an unvariant load reads (one file, or
    shards and their index), not another variant's files nor a pickle; ``model_index.json`` names each
    encoder as the source does. A variant or a hub id is loaded as before."""
    from sdcluster.config import ModelConfig
    from sdcluster.train import export

    source = tmp_path / "source"
    encoder = source / "text_encoder_2"
    encoder.mkdir(parents=True)
    kept = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    kept.append("model.safetensors.index.json")
    others = [
        "model.fp16-00001-of-00002.safetensors",
        "model.safetensors.index.fp16.json",
        "pytorch_model.bin",
    ]
    for name in kept + others:
        (encoder / name).write_text(name)
    (source / "text_encoder").mkdir()
    (source / "text_encoder" / "config.json").write_text("{}")
    index = {
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
    }
    (source / "model_index.json").write_text(json.dumps(index))
    assert export._copied_encoders(FLUX(), str(source), ModelConfig()) == ["text_encoder", "text_encoder_2"]
    assert export._copied_encoders(FLUX(), str(source), ModelConfig(variant="fp16")) == []
    assert export._copied_encoders(FLUX(), "black-forest-labs/FLUX.1-dev", ModelConfig()) == []

    dest = tmp_path / "export"
    dest.mkdir()
    saved = {"_class_name": "FluxPipeline", "text_encoder": [None, None], "text_encoder_2": [None, None]}
    (dest / "model_index.json").write_text(json.dumps(saved))  # what save_pretrained writes for a None part
    export._copy_encoders(["text_encoder", "text_encoder_2"], str(source), dest)
    assert sorted(p.name for p in (dest / "text_encoder_2").iterdir()) == sorted(kept)
    assert (dest / "text_encoder_2" / kept[1]).read_text() == kept[1]
    assert json.loads((dest / "model_index.json").read_text()) == {"_class_name": "FluxPipeline", **index}


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_encoders_loaded_for_a_prompt_the_store_lacks_are_let_go_of_after_validation(
    make_cfg, tmp_path, cache_root, monkeypatch
):
    """A cached run validating a prompt its store lacks loads the encoders once, for that validation, and
    lets go of them after it (the steps never need them); the next validation reads the stored prompt."""
    import transformers

    base = _flux_run(tmp_path, cache_root)
    train(make_cfg([*base, f"output_root={tmp_path / 'first'}"]))  # builds the cache and fills the store
    loads: list[str] = []
    real = transformers.T5EncoderModel.from_pretrained

    def counted(*args, **kwargs):
        loads.append(kwargs.get("subfolder", ""))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.T5EncoderModel, "from_pretrained", counted)
    lines, logger = _Lines(), logging.getLogger("sdcluster")
    monkeypatch.setattr(logger, "level", logging.INFO)
    logger.addHandler(lines)
    try:
        overrides = ["train.validation_prompts=[a faded pair]", "train.validate_every=1"]
        cfg = make_cfg([*base, *overrides, f"output_root={tmp_path / 'new prompt'}"])
        assert train(cfg).step == 2
    finally:
        logger.removeHandler(lines)
    assert loads == ["text_encoder_2"], "T5 loaded once, for the first validation's new prompt"
    released = [line for line in lines.lines if line.startswith("text encoders released")]
    assert len(released) == 1 and "text_encoder_2" in released[0]
    validated = [line for line in lines.lines if line.startswith("validation step")]
    assert len(validated) == 2 and lines.lines.index(released[0]) < lines.lines.index(validated[0])
