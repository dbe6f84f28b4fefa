"""The embedded tiny Stable Diffusion: real diffusers/transformers classes, random weights, built offline.

It exists so that the default run and the tests exercise exactly the code path SD 1.4 takes (same classes,
same folder layout, ``StableDiffusionPipeline.from_pretrained`` loads it) without hub access or a GPU.
The VAE downsamples by 8 like SD's, so resolutions and latent shapes follow the same rules.
The tokenizer is a real CLIP BPE tokenizer whose merges are learned here from the sample captions.

:mod:`sdcluster.models.embedded` finds or builds it (and the tiny SDXL) in the cache.
"""

from __future__ import annotations

import collections
import itertools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

# Bump when the architecture or tokenizer changes, so cached copies are rebuilt instead of reused.
TINY_VERSION = "1"
MARKER = "sdcluster-tiny.json"

_CORPUS = """
a single pair of denim jeans laid flat on a white background viewed from the front back side
the jeans have a slightly faded appearance with visible back pockets and a zipper fly button belt loops
legs are spread apart with natural creases and the rise area is clearly visible folded partially
a small black square reference marker is placed near the upper right left corner of the image
dark blue light wash stone washed denim pant trousers straight slim wide leg cuffed hem seams stitching
photo picture studio lighting shadow soft top down view close up overhead product shot clean
"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table (the base of any CLIP vocabulary)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _learn_bpe(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE over a word list, in CLIP's convention (the last symbol of a word carries ``</w>``)."""
    vocab = collections.Counter((*w[:-1], w[-1] + "</w>") for w in words if w)
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, freq in vocab.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += freq
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged: collections.Counter[tuple[str, ...]] = collections.Counter()
        for word, freq in vocab.items():
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += freq
        vocab = merged
    return merges


def write_tokenizer(dest: Path) -> int:
    """Write a CLIP tokenizer (vocab.json, merges.txt, configs) into ``dest``; return the vocabulary size."""
    from transformers import CLIPTokenizer

    base = list(_bytes_to_unicode().values())
    merges = _learn_bpe(_CORPUS.split(), num_merges=300)
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.json").write_text(json.dumps(vocab))
    (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tokenizer = CLIPTokenizer(str(dest / "vocab.json"), str(dest / "merges.txt"), pad_token="<|endoftext|>")
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(dest)
    return len(vocab)


# The tiny model's shapes (diffusers' unit-test sizes). Other shapes (the benchmarks' SD-1.x-shaped model)
# go through the same :func:`build_pipeline`.
TINY_UNET: dict[str, Any] = {
    "sample_size": 8,
    "layers_per_block": 2,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
}
TINY_VAE: dict[str, Any] = {"block_out_channels": (8, 16, 16, 16), "layers_per_block": 1, "sample_size": 64}
TINY_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
}


def tokenizers(*pad_tokens: str | None) -> tuple[int, list[Any]]:
    """(vocabulary size, one CLIP tokenizer of :func:`write_tokenizer`'s vocabulary per pad token; None:
    CLIP's own ``<|endoftext|>``)."""
    from transformers import CLIPTokenizer

    work = Path(tempfile.mkdtemp(prefix="tok-"))
    try:
        vocab_size = write_tokenizer(work)
        pads = [{} if pad is None else {"pad_token": pad} for pad in pad_tokens]
        return vocab_size, [CLIPTokenizer.from_pretrained(work, **pad) for pad in pads]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def text_config(vocab_size: int, tokenizer: Any, shape: dict[str, Any]) -> Any:
    """A CLIP text encoder's config of ``shape`` for ``tokenizer``'s special tokens (77 positions)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )


def make_vae(shape: dict[str, Any], **extra: Any) -> Any:
    """SD's 4-block VAE (downsampling by 8, 4 latent channels) of ``shape``, seeded; ``extra``: config keys
    such as SDXL's ``scaling_factor`` or SD3's and FLUX's 16 ``latent_channels``, shift and no quant
    convolutions."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8,
        **shape,
        **{"latent_channels": 4, **extra},
    )


def build_pipeline(dest: Path, unet: dict[str, Any], vae: dict[str, Any], text: dict[str, Any]) -> Path:
    """Write a random-weight Stable Diffusion folder of the given shapes to ``dest`` (seeded: reproducible).

    Real diffusers/transformers classes in the standard layout, the vocabulary of :func:`write_tokenizer`,
    SD 1.x's 4-block VAE with 4 latent channels and its PNDM noise schedule.
    """
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    vocab_size, (tokenizer,) = tokenizers(None)
    torch.manual_seed(0)  # before each component: its weights do not depend on the others' sizes
    unet_model = UNet2DConditionModel(in_channels=4, out_channels=4, **unet)
    vae_model = make_vae(vae)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text_config(vocab_size, tokenizer, text))
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae_model,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet_model,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(dest, safe_serialization=True)
    return dest


def build_tiny_pipeline(dest: Path) -> Path:
    """Build the tiny pipeline into ``dest`` with fixed seeds; the marker file is written last."""
    build_pipeline(dest, TINY_UNET, TINY_VAE, TINY_TEXT)
    (dest / MARKER).write_text(json.dumps({"version": TINY_VERSION}))
    return dest
