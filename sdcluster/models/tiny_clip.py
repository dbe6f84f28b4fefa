"""The embedded tiny CLIP (``generate.scores.clip_model=tiny``): real transformers classes, random weights.

It lets the tests and the CPU demo run the exact scoring path a real CLIP takes (``CLIPModel`` and
``CLIPProcessor.from_pretrained`` on a folder in the standard layout) without hub access. Its weights are
random, so its similarities mean nothing; they are deterministic (fixed seed) and within [-1, 1], which is
what tests can rely on. Built offline; the tokenizer is the tiny Stable Diffusion's
(:func:`sdcluster.models.tiny.write_tokenizer`).

    python -m sdcluster.models.tiny_clip [CACHE_ROOT]      # build (or find) it and print where it is
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from sdcluster import atomic
from sdcluster.models.tiny import write_tokenizer

# Bump when the architecture changes, so cached copies are rebuilt instead of reused.
TINY_CLIP_VERSION = "1"
_MARKER = "sdcluster-tiny-clip.json"
_IMAGE_SIZE = 32  # the processor resizes every image to this; small keeps a batch cheap on CPU


def tiny_clip_dir(cache_root: Path | str) -> Path:
    return Path(cache_root) / "models" / "tiny_clip" / f"v{TINY_CLIP_VERSION}"


def build_tiny_clip(dest: Path) -> Path:
    """Write a seeded random-weight CLIP (model, tokenizer, image processor) into ``dest``; marker last."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    vocab_size = write_tokenizer(dest)
    tokenizer = CLIPTokenizer.from_pretrained(dest)
    text = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=_IMAGE_SIZE,
        patch_size=8,
    )
    torch.manual_seed(0)
    model = CLIPModel(
        CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": _IMAGE_SIZE}, crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}
    )
    model.save_pretrained(dest, safe_serialization=True)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(dest)
    (dest / _MARKER).write_text(json.dumps({"version": TINY_CLIP_VERSION}))
    return dest


def is_complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file() and any(folder.glob("*.safetensors"))


def ensure_tiny_clip(cache_root: Path | str) -> Path:
    """The cached tiny CLIP folder, built first if needed; published in one rename like the tiny model."""
    dest = tiny_clip_dir(cache_root)
    if is_complete(dest):
        return dest
    with atomic.explain_disk_full(dest, resume=": the model is built again", setting="cache_root"):
        tmp = atomic.staging_dir(dest)
        try:
            build_tiny_clip(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic.publish_dir(tmp, dest, replace=not is_complete(dest))
    return dest


if __name__ == "__main__":
    print(ensure_tiny_clip(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".cache/sdcluster")))
