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
from sdcluster.models.load import check_safetensors
from sdcluster.models.schedulers import set_scheduler

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


def require_model(path: Path) -> None:
    """Fail with the fix when the model folder is missing (the same check preflight makes at submit time)."""
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
    """The pipeline with our scheduler, no safety checker and no tqdm bars (they garble SLURM log files)."""
    from diffusers import StableDiffusionPipeline

    model = paths.generation_model(cfg)
    require_model(model)
    device, dtype = choose_device_dtype(cfg.generate.mixed_precision)
    if device.type == "cpu" and cfg.generate.mixed_precision != "no":
        log.info(
            "generate.mixed_precision=%s ignored on CPU: generating in float32", cfg.generate.mixed_precision
        )
    pipe = StableDiffusionPipeline.from_pretrained(
        model,
        **{_dtype_keyword(): dtype},
        use_safetensors=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    set_scheduler(pipe, cfg.generate.scheduler)
    pipe.set_progress_bar_config(disable=True)
    if cfg.generate.batch_size > 1:
        # Decode one image at a time: the VAE decode is the memory peak of a batch (SD 1.x at 512 px: about
        # 1 GiB an image in fp32), and slicing costs little (small model, batch 8 on CPU: 1.3% of the call).
        # Always, not "when memory is short": a choice made from free memory would let two shards of one
        # job decode differently and round differently. diffusers 0.42 removed pipe.enable_vae_slicing();
        # the VAE's own method exists in every version we support.
        pipe.vae.enable_slicing()
    return pipe.to(device)


class PromptEmbeddings:
    """Text embeddings per unique prompt, computed once and reused by every batch that repeats the prompt.

    Items are in prompt-major order, so a small LRU holds every prompt a shard is still working on.
    """

    def __init__(self, pipe: Any, negative_prompt: str | None, guidance_scale: float, size: int = 64) -> None:
        self.pipe = pipe
        self.negative_prompt = negative_prompt
        self.guidance = guidance_scale > 1.0  # the pipeline's own test for classifier-free guidance
        self.size = size
        self.cache: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
        self.encoded = 0  # how many text-encoder calls were made (tests check the reuse)

    def encode(self, prompt: str) -> tuple[Any, Any]:
        import torch

        if prompt in self.cache:
            self.cache.move_to_end(prompt)
            return self.cache[prompt]
        with torch.no_grad():  # unlike the pipeline call, encode_prompt does not turn autograd off itself
            embeds = self.pipe.encode_prompt(
                prompt, self.pipe.device, 1, self.guidance, negative_prompt=self.negative_prompt
            )
        self.encoded += 1
        self.cache[prompt] = embeds
        if len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return embeds

    def batch(self, prompts: list[str]) -> dict[str, Any]:
        """``prompt_embeds`` (and ``negative_prompt_embeds`` under guidance) for a pipeline call."""
        import torch

        pairs = [self.encode(p) for p in prompts]
        kwargs = {"prompt_embeds": torch.cat([pos for pos, _ in pairs])}
        if self.guidance:
            kwargs["negative_prompt_embeds"] = torch.cat([neg for _, neg in pairs])
        return kwargs


def render(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    gen: GenerateConfig,
    embeddings: PromptEmbeddings | None = None,
) -> list[Any]:
    """One pipeline call for a batch; PIL images in input order.

    Each image gets its own generator seeded with its own seed, so its noise (initial latents and the noise
    of stochastic samplers like euler_a) is the same whatever else is in the batch; one generator for the
    batch would make image k's noise depend on its position. The generators are CPU ones: a CPU random
    stream is the same on every machine, so a seed from the manifest gives the same starting noise on a GPU
    node or a laptop (a CUDA generator gives other numbers). Without ``embeddings`` the prompts are passed
    as text, the pipeline's reference path.
    """
    import torch

    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    if embeddings is not None:
        text: dict[str, Any] = embeddings.batch(prompts)
    else:
        negative = None if gen.negative_prompt is None else [gen.negative_prompt] * len(prompts)
        text = {"prompt": list(prompts), "negative_prompt": negative}
    return pipe(
        **text,
        generator=generators,
        num_inference_steps=gen.steps,
        guidance_scale=gen.guidance_scale,
        height=gen.height,
        width=gen.width,
    ).images
