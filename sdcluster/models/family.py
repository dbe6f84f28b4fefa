"""Model families: what differs between Stable Diffusion 1.x/2.x and SDXL, in one small object each.

The training loop, the latent cache, validation, the export and generation ask the family of the loaded
model for these things instead of branching on it:

- which text encoders and tokenizers it has (:meth:`SD1.text_encoders`, :meth:`SD1.tokenizers`) and what
  the encoders make of token ids (:meth:`SD1.encode`: hidden states, and SDXL's pooled embedding);
- the UNet's conditioning for a batch (:meth:`SD1.unet_conditioning`): SDXL's size and crop conditioning
  comes from each image's original size and crop offsets, which every training example carries as
  ``time_ids`` (original height, width, crop top, left, target height, width: ``add_time_ids``);
- the pipeline class that builds, saves and loads it (and the keywords only one of them takes);
- the VAE's dtype under mixed precision: SDXL's published VAE overflows in fp16, so it stays in fp32 unless
  ``model.vae_path`` names a VAE made for half precision, as diffusers' SDXL examples do.

The family is read from the model's ``model_index.json`` (``_class_name``), so a local SDXL folder, the hub's
SDXL and ``tiny_sdxl`` are all SDXL without a setting that could disagree with the weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # torch is imported where it is used: the login node's checks load this module
    import torch

TIME_IDS = "time_ids"
"""The batch key of each example's SDXL size/crop numbers (see :func:`sdcluster.data.dataset.time_ids`)."""


class SD1:
    """Stable Diffusion 1.x/2.x: the UNet is conditioned on one CLIP text encoder's last hidden states."""

    name: ClassVar[str] = "sd1"
    pipeline_name: ClassVar[str] = "StableDiffusionPipeline"
    text_encoder_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "out_proj")
    """The CLIP attention projections diffusers' LoRA examples adapt in the text encoders."""
    text_arrays: ClassVar[tuple[str, ...]] = ("text",)
    """The latent cache's arrays of caption encodings (one row per distinct caption)."""
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer",)
    """The pipeline's tokenizer components."""

    @property
    def pipeline_class(self) -> Any:
        import diffusers

        return getattr(diffusers, self.pipeline_name)

    def pipeline_kwargs(self) -> dict[str, Any]:
        """What ``from_pretrained`` and the constructor need besides the components: no safety checker (a
        research tool's choice, said in the README)."""
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def text_encoders(self, comps: Any) -> dict[str, Any]:
        """The text encoders by the name ``save_lora_weights`` gives their layers."""
        return {"text_encoder": comps.text_encoder}

    def tokenizers(self, comps: Any) -> dict[str, Any]:
        """The tokenizers by the batch key of their ids."""
        return {"input_ids": comps.tokenizer}

    def encode(
        self, comps: Any, ids: Mapping[str, torch.Tensor], device: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, pooled embedding or None), with autograd (callers decide with ``no_grad``)."""
        return comps.text_encoder(ids["input_ids"].to(device), return_dict=False)[0], None

    def unet_conditioning(
        self, hidden: torch.Tensor, pooled: torch.Tensor | None, time_ids: torch.Tensor | None
    ) -> dict[str, Any]:
        """The UNet's keyword arguments besides the noisy latents and the timesteps."""
        return {"encoder_hidden_states": hidden}

    def frozen_modules(self, comps: Any) -> list[Any]:
        return [comps.vae, *self.text_encoders(comps).values()]

    def vae_dtype(self, model: Any, half: torch.dtype | None) -> torch.dtype | None:
        """The VAE's dtype when mixed precision computes in ``half`` (None: leave it as loaded)."""
        return half

    def pipeline(self, comps: Any, unet: Any, scheduler: Any) -> Any:
        """A pipeline around in-memory components (validation images: nothing reloaded from disk)."""
        parts = {"vae": comps.vae, "unet": unet, "scheduler": scheduler}
        parts.update(self.text_encoders(comps))
        parts.update({name: getattr(comps, name) for name in self.tokenizer_names})
        return self.pipeline_class(**parts, **self.pipeline_kwargs())


class SDXL(SD1):
    """SDXL: two CLIP text encoders whose penultimate hidden states are concatenated, the second one's pooled
    embedding, and the size/crop conditioning, exactly as ``StableDiffusionXLPipeline.encode_prompt`` and
    ``_get_add_time_ids`` compute them (the model sees at training what it sees at generation)."""

    name: ClassVar[str] = "sdxl"
    pipeline_name: ClassVar[str] = "StableDiffusionXLPipeline"
    text_arrays: ClassVar[tuple[str, ...]] = ("text", "pooled")
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {}  # SDXL pipelines have no safety checker

    def text_encoders(self, comps: Any) -> dict[str, Any]:
        return {"text_encoder": comps.text_encoder, "text_encoder_2": comps.text_encoder_2}

    def tokenizers(self, comps: Any) -> dict[str, Any]:
        return {"input_ids": comps.tokenizer, "input_ids_2": comps.tokenizer_2}

    def encode(
        self, comps: Any, ids: Mapping[str, torch.Tensor], device: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        import torch

        hidden, pooled = [], None
        for key, encoder in (("input_ids", comps.text_encoder), ("input_ids_2", comps.text_encoder_2)):
            out = encoder(ids[key].to(device), output_hidden_states=True)
            if out[0].ndim == 2:  # the projected pooled output: only the second encoder has one
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def unet_conditioning(
        self, hidden: torch.Tensor, pooled: torch.Tensor | None, time_ids: torch.Tensor | None
    ) -> dict[str, Any]:
        if pooled is None or time_ids is None:
            raise ValueError("an SDXL batch needs pooled embeddings and each image's size and crop")
        like = {"device": hidden.device, "dtype": hidden.dtype}
        added = {"text_embeds": pooled.to(**like), "time_ids": time_ids.to(**like)}
        return {"encoder_hidden_states": hidden, "added_cond_kwargs": added}

    def vae_dtype(self, model: Any, half: torch.dtype | None) -> torch.dtype | None:
        # SDXL's own VAE produces NaNs in fp16 (diffusers' SDXL examples keep it in fp32 for this reason);
        # a VAE fine-tuned for half precision (model.vae_path) may follow the mixed precision.
        import torch

        if half is None or model.vae_path:
            return half
        return torch.float32


FAMILIES: dict[str, type[SD1]] = {SD1.pipeline_name: SD1, SDXL.pipeline_name: SDXL}


def family_of_index(index: Mapping[str, Any], where: str) -> SD1:
    """The family of a pipeline by its ``model_index.json``; any other pipeline is refused with the fix."""
    name = index.get("_class_name")
    if name not in FAMILIES:
        raise ValueError(
            f"{where} is a {name} pipeline; sdcluster trains and generates with "
            f"{' and '.join(FAMILIES)} (Stable Diffusion 1.x/2.x and SDXL)"
        )
    return FAMILIES[name]()


def family_of(source: str, revision: str | None = None) -> SD1:
    """The family of the pipeline at ``source`` (a folder, or a hub id read through the hub's cache)."""
    from diffusers import DiffusionPipeline

    return family_of_index(DiffusionPipeline.load_config(source, revision=revision), source)
