"""The model family a run trains: how its pipeline is built and saved, and where its text encoder is adapted.

Stable Diffusion 1.x/2.x (one CLIP text encoder, ``StableDiffusionPipeline``) is the only family today.
SDXL would be a second class of the same shape (two text encoders, pooled embeddings and size conditioning,
``StableDiffusionXLPipeline``): the training methods (:mod:`sdcluster.train.method`) ask the family for
these things, so they would not change.
"""

from __future__ import annotations

from typing import Any, ClassVar


class SD1:
    """Stable Diffusion 1.x/2.x: the UNet is conditioned on one CLIP text encoder's hidden states."""

    name: ClassVar[str] = "sd1"
    text_encoder_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "out_proj")
    """The CLIP attention projections diffusers' LoRA examples adapt in the text encoder."""

    @property
    def pipeline_class(self) -> Any:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def text_encoders(self, comps: Any) -> dict[str, Any]:
        """The text encoders by the name ``save_lora_weights`` gives their layers (``text_encoder``)."""
        return {"text_encoder": comps.text_encoder}

    def encode_prompt_ids(self, comps: Any, input_ids: Any) -> Any:
        """The UNet's conditioning for token ids, with autograd (for a text encoder that is trained)."""
        return comps.text_encoder(input_ids, return_dict=False)[0]


def model_family(cfg: Any) -> SD1:
    """The family of ``cfg.model`` (only SD 1.x/2.x pipelines are supported so far)."""
    return SD1()
