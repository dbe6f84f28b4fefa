"""Text encodings validation needs, kept on disk so that a cached run never loads its text encoders.

The latent cache holds every training caption's encodings. Validation needs two more kinds:

- **captions** of the held-out images: the held-out loss conditions on them exactly as training does (the
  family's ``text_arrays``, :meth:`~sdcluster.models.family.SD1.encode`);
- **prompts**: ``train.validation_prompts`` as the pipeline's own ``encode_prompt`` gives them (with
  ``generate.negative_prompt`` under classifier-free guidance), the keywords its call takes.

Each is one safetensors file, ``<cache_root>/text/<key>/<kind>-<digest>.safetensors``: the key is the
encoders' identity (family, source, revision, variant, the tokenizer and text-encoder files' sizes and
mtimes, the dtypes the encoders compute in), the digest the text's. A cache build (``task=cache``, or a
training job's own) fills the store while its encoders are loaded (:func:`fill`); a job that misses one
loads the encoders it needs (:mod:`sdcluster.models.text_encoders`) and writes it, so the next job does not.
Files are written whole in one rename, by whichever rank gets there: equal contents, so a race is harmless.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sdcluster import atomic
from sdcluster.identity import stable_hash
from sdcluster.models.load import model_files

if TYPE_CHECKING:
    from sdcluster.config import Config
    from sdcluster.models.load import Components

log = logging.getLogger("sdcluster")

STORE_VERSION = 1  # bump when what a file holds changes


def store_dir(cfg: Config, comps: Components) -> Path:
    """``<cache_root>/text/<key>``: the store of this model's text encoders at the dtypes they run in."""
    family = comps.family
    parts = (*family.tokenizer_classes, *family.text_encoder_classes)
    identity = {
        "version": STORE_VERSION,
        "family": family.name,
        "source": comps.source,
        "revision": cfg.model.revision,
        "variant": cfg.model.variant,
        "files": model_files(comps.source, parts, cfg.model.revision),
        "dtypes": [str(dtype) for dtype in comps.text_encoders.dtypes().values()],
    }
    return Path(cfg.cache_root) / "text" / stable_hash(identity, 24)


class TextStore:
    """Encodings by text, read from disk, else computed (loading the encoders) and written there."""

    def __init__(self, folder: Path, comps: Components, device: Any) -> None:
        self.folder, self.comps, self.device = folder, comps, device
        self.computed = 0  # encodings this process computed (the rest were read)

    @classmethod
    def of(cls, cfg: Config, comps: Components, device: Any) -> TextStore:
        return cls(store_dir(cfg, comps), comps, device)

    def _path(self, kind: str, *key: object) -> Path:
        return self.folder / f"{kind}-{stable_hash([kind, *key], 24)}.safetensors"

    def _get(self, path: Path, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        from safetensors.torch import load, save

        try:
            found = load(path.read_bytes())
        except FileNotFoundError:
            found = None
        except Exception as err:  # a truncated or foreign file: computed again and replaced
            log.warning("text store: %s is unreadable (%s): computing it again", path, err)
            found = None
        if found is None:
            with torch.no_grad():
                found = {name: t.detach().contiguous().cpu() for name, t in compute().items()}
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_bytes(path, save(found))
            self.computed += 1
        return {name: t.to(self.device) for name, t in found.items()}

    def has(self, kind: str, *key: object) -> bool:
        return self._path(kind, *key).is_file()

    def caption(self, caption: str) -> dict[str, torch.Tensor]:
        """One caption's encodings, a batch of one per name of the family's ``text_arrays``: what training
        conditions on (and what the latent cache stores for a training caption)."""
        from sdcluster.data.dataset import tokenize_captions

        family = self.comps.family

        def compute() -> dict[str, torch.Tensor]:
            ids = tokenize_captions(family.tokenizers(self.comps), [caption])
            encoded = family.encode(self.comps, ids, self.device)
            return {kind: encoded[kind] for kind in family.text_arrays}

        return self._get(self._path("caption", caption), compute)

    def prompt(
        self, prompt: str, negative: str | None, guidance: bool, pipe: Callable[[], Any]
    ) -> dict[str, torch.Tensor]:
        """One prompt's embeddings by the pipeline call's keywords (``Family.prompt_embeds``); ``pipe()``
        gives a pipeline with its text encoders, called only when the store lacks them."""
        family = self.comps.family
        return self._get(
            self._path("prompt", prompt, negative, guidance),
            lambda: family.prompt_embeds(pipe(), prompt, negative, guidance),
        )


def validation_texts(cfg: Config) -> tuple[list[str], list[tuple[str, str | None, bool]]]:
    """What validation encodes: the held-out captions (or the fallback images') and each validation
    prompt with the negative prompt and guidance switch it is rendered with."""
    from sdcluster.data.sources import loss_captions

    guidance = cfg.generate.guidance_scale > 1.0  # the pipelines' own test for classifier-free guidance
    prompts = [(p, cfg.generate.negative_prompt, guidance) for p in cfg.train.validation_prompts]
    return loss_captions(cfg), prompts


def fill(cfg: Config, comps: Components, device: Any) -> int:
    """Write what validation will read and the store lacks; the count written. Run where the encoders are
    loaded anyway (a cache build), so that the training jobs after it load none."""
    store = TextStore.of(cfg, comps, device)
    captions, prompts = validation_texts(cfg)
    missing = [c for c in dict.fromkeys(captions) if not store.has("caption", c)]
    missing_prompts = [p for p in dict.fromkeys(prompts) if not store.has("prompt", *p)]
    if not missing and not missing_prompts:
        return 0
    pipe = None

    def pipeline() -> Any:
        nonlocal pipe
        if pipe is None:  # the denoiser and the scheduler play no part in encoding a prompt: none loaded
            with warnings.catch_warnings():  # the pipeline fixes old scheduler settings itself, warning
                warnings.filterwarnings("ignore", "The configuration file of this scheduler", FutureWarning)
                pipe = comps.family.pipeline(comps, None, comps.noise_scheduler)
        return pipe

    for caption in missing:
        store.caption(caption)
    for prompt in missing_prompts:
        store.prompt(*prompt, pipeline)
    log.info(
        "text store: %d held-out captions and %d validation prompts encoded into %s",
        len(missing),
        len(missing_prompts),
        store.folder,
    )
    return store.computed
