"""SDXL is trained on the conditioning it is sampled with: for the same captions and sizes, the UNet inputs a
training batch gets (hidden states of both text encoders, the pooled embedding, ``add_time_ids``) are the
tensors diffusers' ``StableDiffusionXLPipeline.encode_prompt`` and ``_get_add_time_ids`` give.

The images are made here with known sizes, so the expected size and crop numbers are written out by hand
(center crop), not read from the batch under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.slow

RESOLUTION = 64
# file name, caption, (width, height), and SDXL's (original size, crop top-left) after a center crop to 64
# (rows come sorted by file name, so this is also the batch's order)
IMAGES = [
    ("tall.png", "a pair of light wash denim shorts, folded", (64, 80), ((80, 64), (8, 0))),
    ("wide.png", "dark blue jeans laid flat", (96, 64), ((64, 96), (0, 16))),
]


def _folder(dest: Path) -> Path:
    dest.mkdir()
    with open(dest / "metadata.jsonl", "w") as fh:
        for index, (name, caption, size, _) in enumerate(IMAGES):
            Image.new("RGB", size, (40 * index, 90, 160)).save(dest / name)
            fh.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return dest


def test_sdxl_training_conditioning_is_what_the_pipeline_samples_with(make_cfg, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from sdcluster.data.dataset import TrainImages, collate, load_captioned_images
    from sdcluster.models.load import load_components
    from sdcluster.train.loss import conditioning

    cfg = make_cfg(["model=tiny_sdxl"])
    comps = load_components(cfg.model, cfg.cache_root)
    assert comps.family.name == "sdxl"
    rows = load_captioned_images(_folder(tmp_path / "data"))
    assert list(rows["file_name"]) == [name for name, *_ in IMAGES]
    examples = TrainImages(rows, comps.family.tokenizers(comps), RESOLUTION, True, False)
    batch = collate([examples[(index, 0)] for index in range(len(IMAGES))])
    with torch.no_grad():
        cond = conditioning(comps, batch, "cpu")

    pipe = StableDiffusionXLPipeline.from_pretrained(comps.source, use_safetensors=True)
    hidden, pooled, time_ids = [], [], []
    for _, caption, _, (original, crop) in IMAGES:
        with torch.no_grad():
            embeds, _, pooled_embeds, _ = pipe.encode_prompt(
                caption, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        hidden.append(embeds)
        pooled.append(pooled_embeds)
        time_ids.append(
            pipe._get_add_time_ids(
                original,
                crop,
                (RESOLUTION, RESOLUTION),
                dtype=embeds.dtype,
                text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
            )
        )

    added = cond["added_cond_kwargs"]
    assert set(cond) == {"encoder_hidden_states", "added_cond_kwargs"}
    assert set(added) == {"text_embeds", "time_ids"}
    torch.testing.assert_close(cond["encoder_hidden_states"], torch.cat(hidden), rtol=0, atol=1e-6)
    torch.testing.assert_close(added["text_embeds"], torch.cat(pooled), rtol=0, atol=1e-6)
    torch.testing.assert_close(added["time_ids"], torch.cat(time_ids), rtol=0, atol=0)
    # the two captions and the two sizes give two different rows each: nothing constant passes
    assert not torch.equal(added["time_ids"][0], added["time_ids"][1])
    assert not torch.equal(added["text_embeds"][0], added["text_embeds"][1])
