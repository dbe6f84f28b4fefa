"""The diffusers side of generation: load the pipeline for a config, encode prompts once, render one batch.

Kept apart from :mod:`sdcluster.generate.job` (which decides *what* to make and where it goes), so reproducing
one image from its manifest record needs only :func:`load_pipeline` and :func:`render`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

from sdcluster import paths
from sdcluster.config import Config, ConfigError, GenerateConfig
from sdcluster.generate.prompts import Sampling
from sdcluster.model_source import is_single_file
from sdcluster.models.family import family_of_pipeline
from sdcluster.models.load import check_safetensors
from sdcluster.models.lora import apply_lora, base_source, lora_weights
from sdcluster.models.samplers import set_sampler

log = logging.getLogger(__name__)


def choose_device_dtype(mixed_precision: str) -> tuple[Any, Any]:
    """CUDA with the requested half precision if there is a GPU, else CPU in float32 (half is slow there)."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu"), torch.float32
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    return torch.device("cuda"), dtype


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def require_model(path: Path | str, lora: Path | None = None) -> None:
    """Fail with the fix when the model folder is missing (the same check preflight makes at submit time).

    A ``str`` is a LoRA run's base model as configured (``model.path``), checked with the model group at
    launch; ``lora`` (see ``paths.generation_lora``) must hold LoRA weights.
    """
    if lora is not None:
        from sdcluster.models.lora import require_lora

        require_lora(lora)
    if isinstance(path, str):
        return
    if is_single_file(str(path)):  # a checkpoint in the original layout (models.single_file)
        from sdcluster.models.single_file import check_single_file

        check_single_file(Path(path))
        return
    if not (Path(path) / "model_index.json").is_file():
        raise ConfigError(
            f"generate.model: no diffusers pipeline at {path} (no model_index.json). Fix: train first "
            "(task=train_generate), or set generate.model=DIR to an exported pipeline folder"
        )
    check_safetensors(Path(path), "generate.model")


def _dtype_keyword() -> str:
    """``dtype`` where diffusers has it (diffusers#14205 deprecated ``torch_dtype``), else ``torch_dtype``.

    Older releases do not know ``dtype``; newer ones warn on every load about ``torch_dtype``.
    """
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def load_pipeline(cfg: Config) -> Any:
    """The model's pipeline (SD 1.x/2.x or SDXL, read from its ``model_index.json``) with our scheduler, no
    safety checker and no tqdm bars (they garble SLURM log files)."""
    model = paths.generation_model(cfg)
    require_model(model)
    device, dtype = choose_device_dtype(cfg.generate.mixed_precision)
    if device.type == "cpu" and cfg.generate.mixed_precision != "no":
        log.info(
            "generate.mixed_precision=%s ignored on CPU: generating in float32", cfg.generate.mixed_precision
        )
    if is_single_file(str(model)):  # its own weights, the configs of generate.model_config (or model.path)
        from sdcluster.models.single_file import load_single_file

        pipe, family = load_single_file(cfg, Path(model), dtype, _dtype_keyword())
    else:
        pipe, family = _load_folder(cfg, model, dtype)
    lora = paths.generation_lora(cfg)
    if lora is not None:  # a LoRA run's adapters, or generate.lora, on top of the model
        apply_lora(pipe, lora_weights(cfg, lora), cfg.generate.lora_scale)
        if lora == paths.run_paths(cfg).lora:  # the run's objective says what its adapters learned to predict
            family.objective(pipe.scheduler, cfg.train.prediction_type).configure(pipe.scheduler)
    set_sampler(pipe, cfg.generate.scheduler)
    pipe.set_progress_bar_config(disable=True)
    if cfg.generate.batch_size > 1:
        # Decode one image at a time: the VAE decode is the memory peak of a batch (SD 1.x at 512 px: about
        # 1 GiB an image in fp32), and slicing costs little (small model, batch 8 on CPU: 1.3% of the call).
        # Always, not "when memory is short": a choice made from free memory would let two shards of one
        # job decode differently and round differently. diffusers 0.42 removed pipe.enable_vae_slicing();
        # the VAE's own method exists in every version we support.
        pipe.vae.enable_slicing()
    return pipe.to(device)


def _load_folder(cfg: Config, model: Path | str, dtype: Any) -> tuple[Any, Any]:
    """The pipeline of a diffusers folder or of the model named by id, and its family."""
    from sdcluster.models.family import family_of
    from sdcluster.models.load import load_vae_override

    source, pinned = (str(model), {}) if isinstance(model, Path) else base_source(cfg)
    family = family_of(source, pinned.get("revision"))
    parts: dict[str, Any] = {}
    if model == cfg.model.path and cfg.model.vae_path:  # the base model with the VAE the run used
        parts["vae"] = load_vae_override(cfg.model, dtype)
    pipe = family.pipeline_class.from_pretrained(
        source,
        **{_dtype_keyword(): dtype},
        **pinned,
        **parts,
        **family.pipeline_kwargs(),
        use_safetensors=True,
    )
    return pipe, family


class PromptEmbeddings:
    """Text embeddings per unique (prompt, negative prompt), computed once and reused by every batch.

    The pipeline's ``encode_prompt`` as the family calls it (``Family.prompt_embeds``), by keyword: SD 1.x/2.x
    gives the prompt's and the negative prompt's embeddings, SDXL and SD3 also their pooled embeddings, FLUX
    its T5 sequence and CLIP pooled output; each is passed back under its call keyword.

    Items are in prompt-major order, so a small LRU holds every prompt a shard is still working on. The
    negative prompt is part of the key because a program's templates each carry their own; the constructor's
    ``negative_prompt`` and ``guidance_scale`` are used for a batch called without ``sampling``.
    """

    def __init__(
        self, pipe: Any, negative_prompt: str | None = None, guidance_scale: float = 7.5, size: int = 64
    ) -> None:
        self.pipe = pipe
        self.default = Sampling(negative_prompt, guidance_scale, 0)
        self.size = size
        self.cache: OrderedDict[tuple[str, str | None, bool], dict[str, Any]] = OrderedDict()
        self.encoded = 0  # how many text-encoder calls were made (tests check the reuse)

    def encode(self, prompt: str, negative: str | None, guidance: bool) -> dict[str, Any]:
        import torch

        key = (prompt, negative, guidance)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        with torch.no_grad():  # unlike the pipeline call, encode_prompt does not turn autograd off itself
            # by the call's keywords, as the family's pipeline encodes (FLUX's encode_prompt is another's)
            embeds = family_of_pipeline(self.pipe).prompt_embeds(self.pipe, prompt, negative, guidance)
        self.encoded += 1
        self.cache[key] = embeds
        if len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return embeds

    def batch(self, prompts: list[str], sampling: Sampling | None = None) -> dict[str, Any]:
        """``prompt_embeds`` (and ``negative_prompt_embeds`` under guidance) for a pipeline call."""
        import torch

        sampling = sampling or self.default
        guidance = sampling.guidance_scale > 1.0  # the pipeline's own test for classifier-free guidance
        encoded = [self.encode(p, sampling.negative_prompt, guidance) for p in prompts]
        names = [name for name in encoded[0] if guidance or not name.startswith("negative")]
        return {name: torch.cat([e[name] for e in encoded]) for name in names}


def render(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    gen: GenerateConfig,
    embeddings: PromptEmbeddings | None = None,
    sampling: Sampling | None = None,
) -> list[Any]:
    """One pipeline call for a batch; PIL images in input order.

    Each image gets its own generator seeded with its own seed, so its noise (initial latents and the noise
    of stochastic samplers like euler_a) is the same whatever else is in the batch; one generator for the
    batch would make image k's noise depend on its position. The generators are CPU ones: a CPU random
    stream is the same on every machine, so a seed from the manifest gives the same starting noise on a GPU
    node or a laptop (a CUDA generator gives other numbers). Without ``embeddings`` the prompts are passed
    as text, the pipeline's reference path. ``sampling`` (a template's negative prompt, guidance and steps)
    defaults to ``gen``'s.
    """
    import torch

    sampling = sampling or Sampling(gen.negative_prompt, gen.guidance_scale, gen.steps)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    if embeddings is not None:
        text: dict[str, Any] = embeddings.batch(prompts, sampling)
    else:
        negative = sampling.negative_prompt
        text = {
            "prompt": list(prompts),
            "negative_prompt": None if negative is None else [negative] * len(prompts),
        }
    return pipe(
        **text,
        generator=generators,
        num_inference_steps=sampling.steps,
        guidance_scale=sampling.guidance_scale,
        height=sampling.height or gen.height,  # a template's size, else generate's
        width=sampling.width or gen.width,
    ).images
