"""Caption dropout (``data.caption_dropout``): a dropped caption is trained on what the family's pipeline
uses for no prompt, cached or encoded alike, decided by the step's generator, and resumed exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sdcluster.data import latent_build
from sdcluster.data.dataset import TrainImages, collate, load_captioned_images
from sdcluster.runtime.step_events import stop_at
from sdcluster.train import step_folders
from sdcluster.train.loop import train
from sdcluster.train.loss import caption_drops, conditioning, step_generator
from tests.conftest import copy_sample
from tests.data.test_latent_cache import ONE_PROCESS  # the latent cache's builder on one CPU process

FAST = ["train.log_every=1", "train.checkpoint_every=100", "train.batch_size=2", "train.max_steps=4"]


def _data(tmp_path: Path, suffix: str) -> Path:
    """Three sample images with a caption suffix: a latent-cache key of this test's own."""
    return copy_sample(tmp_path / "data", 3, lambda row: {**row, "text": row["text"] + suffix})


def _pipeline_unconditional(comps) -> dict[str, torch.Tensor]:
    """What the family's diffusers pipeline feeds its unconditional branch when no negative prompt is given
    (classifier-free guidance at generation), read from the pipeline itself."""
    pipe = comps.family.pipeline(comps, comps.denoiser, comps.noise_scheduler)
    with torch.no_grad():
        out = pipe.encode_prompt(
            "a prompt", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
        )
    if len(out) == 2:  # StableDiffusionPipeline: (prompt_embeds, negative_prompt_embeds)
        return {"encoder_hidden_states": out[1]}
    return {"encoder_hidden_states": out[1], "text_embeds": out[3]}  # SDXL: negative states, pooled


def _flat(cond: dict) -> dict[str, torch.Tensor]:
    added = cond.get("added_cond_kwargs", {})
    pooled = {"text_embeds": added["text_embeds"]} if added else {}
    return {"encoder_hidden_states": cond["encoder_hidden_states"], **pooled}


@pytest.mark.parametrize("model", ["tiny", "tiny_sdxl"])
def test_dropped_captions_get_the_pipelines_unconditional_conditioning(make_cfg, tmp_path, model):
    """From the cache and from images alike: dropped rows carry exactly the pipeline's unconditional
    conditioning (SD 1.x: the encoded empty prompt, SDXL: zeros), kept rows their own caption's."""
    from sdcluster.models.load import load_components

    data = _data(tmp_path, f" dropout {model}")
    cfg = make_cfg([f"model={model}", "data=imagefolder", f"data.path={data}", "data.caption_dropout=0.5"])
    comps = load_components(cfg.model, cfg.cache_root)
    dataset = load_captioned_images(cfg.data.path)
    cached = latent_build.open_or_build(cfg, dataset, comps, ONE_PROCESS)
    assert cached is not None and cached.empty_row == 3, "the empty caption is one row after the 3 captions"
    images = TrainImages(dataset, comps.family.tokenizers(comps), cfg.train.resolution, False, True)
    uncond = _pipeline_unconditional(comps)
    drop = torch.tensor([True, False])
    for examples in (cached, images):
        batch = collate([examples[(0, 5)], examples[(1, 6)]])
        with torch.no_grad():
            got = _flat(conditioning(comps, batch, "cpu", drop=drop))
            kept = _flat(conditioning(comps, batch, "cpu"))
        for key, want in uncond.items():
            assert torch.allclose(got[key][0], want[0], atol=1e-5), key
            assert torch.equal(got[key][1], kept[key][1]), key
            assert not torch.allclose(kept[key][0], want[0], atol=1e-3), f"{key}: the caption must differ"


def test_dropout_draws_come_from_the_step_generator_and_none_without_dropout():
    gen = step_generator(0, 7, 0)
    assert caption_drops(4, 0.0, gen) is None
    assert torch.equal(gen.get_state(), step_generator(0, 7, 0).get_state()), "nothing drawn at 0"
    first = caption_drops(1000, 0.3, step_generator(0, 7, 0))
    assert torch.equal(first, caption_drops(1000, 0.3, step_generator(0, 7, 0)))
    assert 0.25 < first.float().mean().item() < 0.35
    assert not torch.equal(first, caption_drops(1000, 0.3, step_generator(0, 8, 0)))


def test_cache_entry_gains_the_empty_caption_only_with_dropout(make_cfg, tmp_path):
    """Without dropout the plan (key, caption rows) is what it always was; with it, one more row and another
    key; a dataset with an empty caption already reuses that row."""
    from sdcluster.data.latent_cache import entry_manifest, make_plan
    from sdcluster.models.load import load_components

    data = copy_sample(tmp_path / "d", 3)
    cfg = make_cfg(["data=imagefolder", f"data.path={data}"])
    comps = load_components(cfg.model, cfg.cache_root)
    dataset = load_captioned_images(data)
    plain = make_plan(cfg, dataset, comps)
    cfg.data.caption_dropout = 0.1
    dropping = make_plan(cfg, dataset, comps)
    assert plain.empty_row is None and "empty_row" not in entry_manifest(plain, 1)
    assert dropping.key != plain.key
    assert dropping.captions == [*plain.captions, ""] and dropping.caption_rows == plain.caption_rows
    assert entry_manifest(dropping, 1)["empty_row"] == len(plain.captions)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    rows[1]["text"] = ""
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with_empty = make_plan(cfg, load_captioned_images(data), comps)
    assert with_empty.empty_row == with_empty.captions.index("") == 1
    assert len(with_empty.captions) == 3


@pytest.mark.slow
def test_cached_and_encoding_runs_follow_the_same_loss_curve_with_dropout(make_cfg, tmp_path):
    """The same captions are dropped whether the conditioning is cached or encoded every step (the cache
    equivalence's tolerance), and dropping changes the curve (the dropout does happen)."""
    data = _data(tmp_path, " curve")
    base = [*FAST, "data=imagefolder", f"data.path={data}", "data.caption_dropout=0.5"]
    plain = train(make_cfg([*base, "data.cache=false", f"output_root={tmp_path / 'plain'}"]))
    cached = train(make_cfg([*base, f"output_root={tmp_path / 'cached'}"]))
    never = train(make_cfg([*base, "data.caption_dropout=0", f"output_root={tmp_path / 'never'}"]))
    assert [s for s, _ in plain.losses] == [s for s, _ in cached.losses] == [1, 2, 3, 4]
    expected = [loss for _, loss in plain.losses]
    assert np.allclose([loss for _, loss in cached.losses], expected, rtol=1e-5, atol=0)
    assert not np.allclose([loss for _, loss in never.losses], expected, rtol=1e-4, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [["train.grad_accum=2"], ["train.method=lora", "train.lora.text_encoder_lr=1e-3"]],
    ids=["cached", "lora-text-encoder"],
)
def test_interrupted_run_with_dropout_resumes_bitwise(make_cfg, tmp_path, extra):
    """Stop, resume, and end where the uninterrupted run ends, the same captions dropped; with the text
    encoder's adapters trained (no cache) the dropped rows run through the encoder as ``""``."""
    data = _data(tmp_path, " resume")
    overrides = [*FAST, "data=imagefolder", f"data.path={data}", "data.caption_dropout=0.5", *extra]
    straight = train(make_cfg([*overrides, f"output_root={tmp_path / 'a'}"]))
    cfg = make_cfg([*overrides, f"output_root={tmp_path / 'b'}"])
    with stop_at(lambda step: step == 2):
        first = train(cfg)
    assert first.interrupted and first.step == 2
    second = train(cfg)
    assert second.losses == [pair for pair in straight.losses if pair[0] > 2]
    from safetensors.torch import load_file

    def newest(run: Path) -> dict[str, torch.Tensor]:
        folder = step_folders.complete_checkpoints(run / "checkpoints")[0]
        files = sorted(folder.glob("model*.safetensors"))  # the UNet's, and each trained text encoder's
        return {f.name + n: t for f in files for n, t in load_file(f).items()}

    a, b = newest(straight.run_dir), newest(second.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
