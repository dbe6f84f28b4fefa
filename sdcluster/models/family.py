"""Model families: what differs between Stable Diffusion 1.x/2.x, SDXL, SD 3.x and FLUX.1, one object each.

The training loop, the method, the latent cache, validation, the export and generation ask the family of the
loaded model (the :class:`Family` protocol) for these things instead of branching on it:

- which components it has and the classes they load with (:attr:`Family.tokenizer_classes`,
  :attr:`Family.text_encoder_classes`, :attr:`Family.denoiser_class`, :attr:`Family.noise_scheduler_class`):
  any number of tokenizers and text encoders, held by their pipeline component names, and which of its
  folders hold weights (:meth:`Family.weighted_parts`, what the safetensors checks look at);
- how captions become conditioning: what the encoders make of token ids (:meth:`Family.encode`, one tensor
  per :attr:`Family.text_arrays` name, which are also the latent cache's arrays and the batch keys of cached
  encodings) and the denoiser's keyword arguments (:meth:`Family.conditioning`). SDXL's size and crop
  conditioning comes from each image's original size and crop offsets, which every training example carries
  as ``time_ids`` (original height, width, crop top, left, target height, width: ``add_time_ids``; the
  target is the image's aspect-ratio bucket with ``data.buckets``, else the ``train.resolution`` square);
- the denoiser (a UNet, SD3's or FLUX's transformer: :attr:`Family.denoiser_name`) and its training
  objective (:meth:`Family.objective`: epsilon or v-prediction, SD3's flow matching, or FLUX's on packed
  latents, which also calls the denoiser: ``Objective.predict``);
- the text encoders' LoRA target modules (:attr:`Family.text_encoder_targets`);
- the pipeline class that builds, saves and loads it (and the keywords only one of them takes);
- the VAE's dtype under mixed precision: SDXL's published VAE overflows in fp16, so it stays in fp32 unless
  ``model.vae_path`` names a VAE made for half precision, as diffusers' SDXL examples do.

The family is read from the model's ``model_index.json`` (``_class_name``), so a local SDXL folder, the hub's
SDXL and ``tiny_sdxl`` are all SDXL without a setting that could disagree with the weights. Another family
(a transformer denoiser with a T5 encoder and flow matching) is one more class here and one more entry in
:data:`FAMILIES`; the loop, the methods, the cache, the weights checks and the export take it as they are
(its objective also applies ``train.prediction_type``, to the training scheduler and to the exported one).
The generation job's dtype (``pipe.unet`` in ``generate/job.py``) still assumes a UNet.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:  # torch is imported where it is used: the login node's checks load this module
    import torch

    from sdcluster.config import ModelConfig
    from sdcluster.models.load import Components
    from sdcluster.models.objectives import Objective

TIME_IDS = "time_ids"
"""The batch key of each example's SDXL size/crop numbers (see :func:`sdcluster.data.dataset.time_ids`)."""


def empty_caption_key(kind: str) -> str:
    """The batch key of the empty caption's cached encoding of a :attr:`Family.text_arrays` array (what
    ``data.caption_dropout`` puts in a dropped caption's place): ``text`` -> ``empty_caption.text``."""
    return f"empty_caption.{kind}"


@runtime_checkable
class Family(Protocol):
    """What a model family owns; :class:`SD1` and :class:`SDXL` implement it."""

    name: ClassVar[str]
    pipeline_name: ClassVar[str]
    tokenizer_classes: ClassVar[Mapping[str, str]]
    """Pipeline component name -> ``transformers`` tokenizer class, in the order the encoders run."""
    text_encoder_classes: ClassVar[Mapping[str, str]]
    """Pipeline component name -> ``transformers`` model class, in the tokenizers' order."""
    denoiser_name: ClassVar[str]
    """The pipeline component that is trained (``unet``; a transformer family's ``transformer``)."""
    denoiser_class: ClassVar[str]
    noise_scheduler_class: ClassVar[str]
    """The ``diffusers`` scheduler the training objective reads from the model's ``scheduler`` folder."""
    text_encoder_targets: ClassVar[tuple[str, ...]]
    text_arrays: ClassVar[tuple[str, ...]]

    def denoiser_width(self, config: Any) -> int | None:
        """The denoiser's width its activations scale with, from its config (None: unknown)."""
        ...

    def token_sequence(self) -> tuple[int, int] | None:
        """A transformer denoiser's sequence per image: (pixels per token side, text tokens); None for a
        UNet. Its activations grow with its depth and its tokens (:mod:`sdcluster.plan.activations`)."""
        ...

    @property
    def pipeline_class(self) -> Any: ...
    def refuse_settings(self, train: Any) -> None:
        """Raise a ``ConfigError`` for a ``train`` setting this family cannot train with (run on the login
        node before the queue, and again when training starts)."""
        ...

    def pipeline_kwargs(self) -> dict[str, Any]: ...
    def prompt_kwargs(self) -> dict[str, Any]: ...
    def prompt_embeds(
        self, pipe: Any, prompt: str, negative: str | None, guidance: bool
    ) -> dict[str, Any]: ...
    def tokenizers(self, comps: Components) -> dict[str, Any]: ...
    def encode(
        self, comps: Components, ids: Mapping[str, torch.Tensor], device: Any
    ) -> dict[str, torch.Tensor]: ...
    def conditioning(
        self, encoded: Mapping[str, torch.Tensor], time_ids: torch.Tensor | None
    ) -> dict[str, Any]: ...
    def unconditional(self, empty: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...
    def weighted_parts(self) -> tuple[str, ...]: ...
    def objective(
        self, noise_scheduler: Any, prediction_type: str | None = None, flow: Any = None
    ) -> Objective: ...
    def sampler(self, name: str, config: Any) -> Any: ...
    def vae_dtype(self, model: ModelConfig, half: torch.dtype | None) -> torch.dtype | None: ...
    def pipeline(self, comps: Components, denoiser: Any, scheduler: Any, text: bool = True) -> Any: ...


PROMPT_EMBEDS = (
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
)
"""What ``encode_prompt`` of the SD 1.x/2.x, SDXL and SD3 pipelines returns, in order, as the pipeline
call's keywords (SD 1.x: the first two)."""


def batch_key(tokenizer: str) -> str:
    """The batch key of a tokenizer's ids: ``tokenizer`` -> ``input_ids``, ``tokenizer_2`` ->
    ``input_ids_2`` (the names diffusers' training examples use)."""
    return "input_ids" + tokenizer.removeprefix("tokenizer")


class SD1:
    """Stable Diffusion 1.x/2.x: the UNet is conditioned on one CLIP text encoder's last hidden states."""

    name: ClassVar[str] = "sd1"
    pipeline_name: ClassVar[str] = "StableDiffusionPipeline"
    tokenizer_classes: ClassVar[Mapping[str, str]] = {"tokenizer": "CLIPTokenizer"}
    text_encoder_classes: ClassVar[Mapping[str, str]] = {"text_encoder": "CLIPTextModel"}
    denoiser_name: ClassVar[str] = "unet"
    denoiser_class: ClassVar[str] = "UNet2DConditionModel"
    noise_scheduler_class: ClassVar[str] = "DDPMScheduler"
    text_encoder_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "out_proj")
    """The CLIP attention projections diffusers' LoRA examples adapt in the text encoders."""
    text_arrays: ClassVar[tuple[str, ...]] = ("text",)
    """The caption encodings: the latent cache's arrays (one row per distinct caption) and batch keys."""

    def denoiser_width(self, config: Any) -> int | None:
        """The channels of the UNet's first (full-resolution) block, which dominates its activations."""
        channels = getattr(config, "block_out_channels", None)
        return int(channels[0]) if channels else None

    def token_sequence(self) -> tuple[int, int] | None:
        """A UNet has no token sequence: its activations are its full-resolution blocks' (their width)."""
        return None

    @property
    def pipeline_class(self) -> Any:
        import diffusers

        return getattr(diffusers, self.pipeline_name)

    def refuse_settings(self, train: Any) -> None:
        """Every ``train`` setting applies to the DDPM families."""

    def pipeline_kwargs(self) -> dict[str, Any]:
        """What ``from_pretrained`` and the constructor need besides the components: no safety checker (a
        research tool's choice, said in docs/reference/training.md)."""
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def prompt_kwargs(self) -> dict[str, Any]:
        """What the pipeline's ``encode_prompt`` needs besides the prompt, the negative prompt and the
        guidance switch (generation encodes each prompt once, ahead of the pipeline call)."""
        return {}

    def prompt_embeds(self, pipe: Any, prompt: str, negative: str | None, guidance: bool) -> dict[str, Any]:
        """One prompt's embeddings by the pipeline call's keywords (``prompt_embeds``, and the negative
        prompt's under classifier-free ``guidance``; SDXL's and SD3's pooled ones too), from the pipeline's
        own ``encode_prompt``; None entries are left out. Call it under ``no_grad``."""
        embeds = pipe.encode_prompt(
            prompt=prompt,
            device=pipe.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=guidance,
            negative_prompt=negative,
            **self.prompt_kwargs(),
        )
        return {key: e for key, e in zip(PROMPT_EMBEDS, embeds, strict=False) if e is not None}

    def tokenizers(self, comps: Components) -> dict[str, Any]:
        """The tokenizers by the batch key of their ids."""
        return {batch_key(name): tokenizer for name, tokenizer in comps.tokenizers.items()}

    def encode(
        self, comps: Components, ids: Mapping[str, torch.Tensor], device: Any
    ) -> dict[str, torch.Tensor]:
        """The caption encodings by :attr:`text_arrays` name, with autograd (callers decide with
        ``no_grad``)."""
        encoder = comps.text_encoders["text_encoder"]
        return {"text": encoder(ids["input_ids"].to(device), return_dict=False)[0]}

    def conditioning(
        self, encoded: Mapping[str, torch.Tensor], time_ids: torch.Tensor | None
    ) -> dict[str, Any]:
        """The denoiser's keyword arguments besides the noisy latents and the timesteps."""
        return {"encoder_hidden_states": encoded["text"]}

    def unconditional(self, empty: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the family's pipelines condition on for an unconditional prompt, given the encodings of the
        empty caption (``empty``, by :attr:`text_arrays` name): a dropped caption (``data.caption_dropout``)
        is trained on it, so classifier-free guidance keeps working. ``StableDiffusionPipeline`` encodes
        ``""``."""
        return dict(empty)

    def weighted_parts(self) -> tuple[str, ...]:
        """The pipeline folders that hold weights (each must have safetensors ones): the denoiser, the VAE
        and every text encoder."""
        return (self.denoiser_name, "vae", *self.text_encoder_classes)

    def objective(
        self, noise_scheduler: Any, prediction_type: str | None = None, flow: Any = None
    ) -> Objective:
        """Denoising diffusion: predict the noise or the velocity, as the scheduler's config says, or as
        ``prediction_type`` (``train.prediction_type``) overrides it; ``flow`` (``model.flow_matching``) is
        for flow-matching families."""
        from sdcluster.models.objectives import NoisePrediction

        return NoisePrediction(noise_scheduler, prediction_type)

    def sampler(self, name: str, config: Any) -> Any:
        """The noise scheduler that samples as ``generate.scheduler`` ``name``, configured like ``config``
        (the model's own scheduler config): any of :data:`sdcluster.models.samplers.SAMPLER_CLASSES`."""
        from sdcluster.models.samplers import make_sampler

        return make_sampler(name, config)

    def vae_dtype(self, model: ModelConfig, half: torch.dtype | None) -> torch.dtype | None:
        """The VAE's dtype when mixed precision computes in ``half`` (None: leave it as loaded)."""
        return half

    def pipeline(self, comps: Components, denoiser: Any, scheduler: Any, text: bool = True) -> Any:
        """A pipeline around in-memory components (validation images: nothing reloaded from disk).

        ``text=False``: only the text encoders loaded already, None for the others, for a caller that
        passes prompt embeddings (from :mod:`sdcluster.data.text_store`) and must not load T5 for nothing;
        every family's pipeline then takes its embeddings' dtype from the denoiser."""
        parts = {"vae": comps.vae, self.denoiser_name: denoiser, "scheduler": scheduler}
        encoders = comps.text_encoders
        parts.update(encoders if text else {name: encoders.loaded().get(name) for name in encoders})
        parts.update(comps.tokenizers)
        return self.pipeline_class(**parts, **self.pipeline_kwargs())


class SDXL(SD1):
    """SDXL: two CLIP text encoders whose penultimate hidden states are concatenated, the second one's pooled
    embedding, and the size/crop conditioning, exactly as ``StableDiffusionXLPipeline.encode_prompt`` and
    ``_get_add_time_ids`` compute them (the model sees at training what it sees at generation)."""

    name: ClassVar[str] = "sdxl"
    pipeline_name: ClassVar[str] = "StableDiffusionXLPipeline"
    tokenizer_classes: ClassVar[Mapping[str, str]] = {
        "tokenizer": "CLIPTokenizer",
        "tokenizer_2": "CLIPTokenizer",
    }
    text_encoder_classes: ClassVar[Mapping[str, str]] = {
        "text_encoder": "CLIPTextModel",
        "text_encoder_2": "CLIPTextModelWithProjection",
    }
    text_arrays: ClassVar[tuple[str, ...]] = ("text", "pooled")

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {}  # SDXL pipelines have no safety checker

    def encode(
        self, comps: Components, ids: Mapping[str, torch.Tensor], device: Any
    ) -> dict[str, torch.Tensor]:
        import torch

        hidden, pooled = [], None
        keys = self.tokenizers(comps)  # the batch keys, in the encoders' order
        for key, encoder in zip(keys, comps.text_encoders.values(), strict=True):
            out = encoder(ids[key].to(device), output_hidden_states=True)
            if out[0].ndim == 2:  # the projected pooled output: only the second encoder has one
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        if pooled is None:
            raise ValueError("SDXL's second text encoder gave no pooled embedding")
        return {"text": torch.cat(hidden, dim=-1), "pooled": pooled}

    def conditioning(
        self, encoded: Mapping[str, torch.Tensor], time_ids: torch.Tensor | None
    ) -> dict[str, Any]:
        hidden, pooled = encoded["text"], encoded.get("pooled")
        if pooled is None or time_ids is None:
            raise ValueError("an SDXL batch needs pooled embeddings and each image's size and crop")
        like = {"device": hidden.device, "dtype": hidden.dtype}
        added = {"text_embeds": pooled.to(**like), "time_ids": time_ids.to(**like)}
        return {"encoder_hidden_states": hidden, "added_cond_kwargs": added}

    def unconditional(self, empty: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Zeros, not the encodings of ``""``: ``StableDiffusionXLPipeline`` zeroes both the hidden states
        and the pooled embedding of a missing negative prompt (``force_zeros_for_empty_prompt``, true in
        SDXL's published ``model_index.json`` and the pipeline's default)."""
        import torch

        return {kind: torch.zeros_like(tensor) for kind, tensor in empty.items()}

    def vae_dtype(self, model: ModelConfig, half: torch.dtype | None) -> torch.dtype | None:
        # SDXL's own VAE produces NaNs in fp16 (diffusers' SDXL examples keep it in fp32 for this reason);
        # a VAE fine-tuned for half precision (model.vae_path) may follow the mixed precision.
        import torch

        if half is None or model.vae_path:
            return half
        return torch.float32


class SD3(SD1):
    """Stable Diffusion 3.x: an MMDiT transformer trained by flow matching, conditioned on two CLIP text
    encoders and T5. As ``StableDiffusion3Pipeline.encode_prompt`` builds it: the CLIP encoders'
    penultimate hidden states, concatenated and zero-padded to the T5 width, followed (along the sequence)
    by T5's last hidden states; the two CLIP pooled projections concatenated. Both are cached text arrays,
    so a cached run never runs T5, nor loads it (:mod:`sdcluster.models.text_encoders`). Written here on
    token ids rather than called: the pipeline's encoders take prompts and tokenize them themselves
    (tests/train/test_sd3.py compares the two)."""

    name: ClassVar[str] = "sd3"
    pipeline_name: ClassVar[str] = "StableDiffusion3Pipeline"
    tokenizer_classes: ClassVar[Mapping[str, str]] = {
        "tokenizer": "CLIPTokenizer",
        "tokenizer_2": "CLIPTokenizer",
        "tokenizer_3": "T5TokenizerFast",
    }
    text_encoder_classes: ClassVar[Mapping[str, str]] = {
        "text_encoder": "CLIPTextModelWithProjection",
        "text_encoder_2": "CLIPTextModelWithProjection",
        "text_encoder_3": "T5EncoderModel",
    }
    denoiser_name: ClassVar[str] = "transformer"
    denoiser_class: ClassVar[str] = "SD3Transformer2DModel"
    noise_scheduler_class: ClassVar[str] = "FlowMatchEulerDiscreteScheduler"
    text_arrays: ClassVar[tuple[str, ...]] = ("text", "pooled")
    t5_tokens: ClassVar[int] = 77
    """T5's sequence length in training: diffusers' SD3 training examples' ``--max_sequence_length``."""
    t5_tokenizer: ClassVar[str] = "tokenizer_3"
    """The pipeline component name of the T5 tokenizer."""

    def denoiser_width(self, config: Any) -> int | None:
        """The transformer's hidden size (heads x head dim), the same in every block (SD3's and FLUX's)."""
        return int(config.num_attention_heads * config.attention_head_dim)

    def token_sequence(self) -> tuple[int, int] | None:
        """2x2 patches of the 8x-downsampled latents (16 pixels a side), after the text: CLIP's 77 states
        and T5's :attr:`t5_tokens` in SD3's joint sequence, T5's alone in FLUX's (:meth:`text_tokens`)."""
        return 16, self.text_tokens()

    def text_tokens(self) -> int:
        return 77 + self.t5_tokens

    # The VAE stays in fp32 under mixed precision, as diffusers' SD3 examples keep it (its published config
    # says force_upcast), unless model.vae_path names one made for half precision: SDXL's rule.
    vae_dtype = SDXL.vae_dtype

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {}  # no safety checker in SD3 pipelines

    def prompt_kwargs(self) -> dict[str, Any]:
        """The second and third encoders' prompts, which SD3's ``encode_prompt`` requires: None, the prompt
        itself for every encoder, as the pipeline's own call does."""
        return {"prompt_2": None, "prompt_3": None}

    def tokenizers(self, comps: Components) -> dict[str, Any]:
        """CLIP's 77 tokens each, T5's :attr:`t5_tokens` (its tokenizer's own length, 512, would encode
        mostly padding)."""
        found = super().tokenizers(comps)
        t5 = found[batch_key(self.t5_tokenizer)]
        t5.model_max_length = min(t5.model_max_length, self.t5_tokens)
        return found

    def encode(
        self, comps: Components, ids: Mapping[str, torch.Tensor], device: Any
    ) -> dict[str, torch.Tensor]:
        import torch
        import torch.nn.functional as F

        hidden, pooled = [], []
        clip_pairs = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
        for encoder, tokenizer in clip_pairs:
            out = comps.text_encoders[encoder](
                ids[batch_key(tokenizer)].to(device), output_hidden_states=True
            )
            pooled.append(out[0])  # the projected pooled output
            hidden.append(out.hidden_states[-2])
        t5 = comps.text_encoders["text_encoder_3"](ids[batch_key("tokenizer_3")].to(device))[0]
        clip = torch.cat(hidden, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"text": torch.cat([clip, t5.to(clip.dtype)], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

    def conditioning(
        self, encoded: Mapping[str, torch.Tensor], time_ids: torch.Tensor | None
    ) -> dict[str, Any]:
        """The transformer's text sequence and pooled projection (no size or crop conditioning)."""
        hidden = encoded["text"]
        return {"encoder_hidden_states": hidden, "pooled_projections": encoded["pooled"].to(hidden.dtype)}

    def refuse_settings(self, train: Any) -> None:
        """The DDPM settings (``train.prediction_type``, ``train.snr_gamma``) have nothing to act on in flow
        matching, and peft cannot adapt T5 the way the CLIP encoders' LoRA targets name (diffusers' SD3 and
        FLUX LoRA formats hold no T5 adapters): refused with the fix."""
        from sdcluster.config import ConfigError

        what = {
            "train.prediction_type": (train.prediction_type, "it predicts the velocity noise - latents"),
            "train.snr_gamma": (train.snr_gamma, "weight the loss with model.flow_matching.loss_weighting"),
            "train.lora.text_encoder_lr": (
                train.lora.text_encoder_lr if train.trains_adapters else None,
                "train the transformer's adapters only (the text encoders stay frozen)",
            ),
        }
        for key, (value, fix) in what.items():
            if value is not None:
                raise ConfigError(
                    f"{key}={value}: not supported for a {self.pipeline_name} model (trained by flow "
                    f"matching). Fix: drop {key}; {fix}"
                )

    def objective(
        self, noise_scheduler: Any, prediction_type: str | None = None, flow: Any = None
    ) -> Objective:
        """Flow matching (:class:`sdcluster.models.objectives.FlowMatching`), with ``model.flow_matching``'s
        timestep sampling and loss weighting; there is no prediction type to choose."""
        from sdcluster.config import ConfigError
        from sdcluster.models.objectives import FlowMatching

        if prediction_type is not None:
            raise ConfigError(
                f"train.prediction_type={prediction_type}: a {self.pipeline_name} model is trained by flow "
                "matching (it predicts the velocity noise - latents). Fix: drop train.prediction_type"
            )
        return FlowMatching(noise_scheduler, flow)

    flow_samplers: ClassVar[tuple[str, ...]] = ("ddim", "euler")
    """The ``generate.scheduler`` names that sample a rectified flow: deterministic DDIM and Euler are one
    and the same step on it, the model's own ``FlowMatchEulerDiscreteScheduler``."""

    def sampler(self, name: str, config: Any) -> Any:
        """The model's flow-matching Euler sampler, for ``ddim`` (the default) and ``euler``; the DDPM
        samplers (their betas and noise predictions) cannot sample a flow-matching model: refused."""
        import diffusers

        from sdcluster.config import ConfigError

        if name not in self.flow_samplers:
            raise ConfigError(
                f"generate.scheduler={name}: a {self.pipeline_name} model samples a rectified flow, which "
                f"the DDPM samplers cannot. Fix: use generate.scheduler={' or '.join(self.flow_samplers)}"
            )
        return getattr(diffusers, self.noise_scheduler_class).from_config(config)


class FLUX(SD3):
    """FLUX.1 (dev, schnell): a rectified-flow transformer on 2x2-packed latents with rotary image and text
    ids, conditioned on T5's last hidden states (the sequence) and one CLIP encoder's pooled output, and, in
    the guidance-distilled dev model, on a guidance value. As ``FluxPipeline.encode_prompt`` builds it (on
    token ids; tests/train/test_flux.py compares the two); the packing, the ids and the guidance are the
    objective's (:class:`sdcluster.models.objectives.PackedFlowMatching`), as diffusers'
    ``train_dreambooth_lora_flux.py`` calls the transformer. Both text arrays are cached: a cached run's
    steps never run T5."""

    name: ClassVar[str] = "flux"
    pipeline_name: ClassVar[str] = "FluxPipeline"
    tokenizer_classes: ClassVar[Mapping[str, str]] = {
        "tokenizer": "CLIPTokenizer",
        "tokenizer_2": "T5TokenizerFast",
    }
    text_encoder_classes: ClassVar[Mapping[str, str]] = {
        "text_encoder": "CLIPTextModel",
        "text_encoder_2": "T5EncoderModel",
    }
    denoiser_class: ClassVar[str] = "FluxTransformer2DModel"
    t5_tokens: ClassVar[int] = 512
    """T5's sequence length in training: ``train_dreambooth_lora_flux.py``'s ``--max_sequence_length``
    and ``FluxPipeline``'s default (so training and generation see the same length)."""
    t5_tokenizer: ClassVar[str] = "tokenizer_2"

    def text_tokens(self) -> int:
        """T5's states alone: FLUX's CLIP gives only its pooled output."""
        return self.t5_tokens

    def prompt_kwargs(self) -> dict[str, Any]:
        """The T5 prompt: None, the prompt itself, as the pipeline's own call does."""
        return {"prompt_2": None}

    def prompt_embeds(self, pipe: Any, prompt: str, negative: str | None, guidance: bool) -> dict[str, Any]:
        """The prompt's T5 sequence and CLIP pooled output; no negative ones: FLUX.1 is not sampled with
        classifier-free guidance (``FluxPipeline`` ignores a negative prompt unless ``true_cfg_scale`` > 1,
        which generation never sets); ``generate.guidance_scale`` is dev's embedded guidance."""
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=prompt, device=pipe.device, num_images_per_prompt=1, **self.prompt_kwargs()
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def encode(
        self, comps: Components, ids: Mapping[str, torch.Tensor], device: Any
    ) -> dict[str, torch.Tensor]:
        """``text``: T5's last hidden states; ``pooled``: CLIP's pooled output (``_get_t5_prompt_embeds``,
        ``_get_clip_prompt_embeds``)."""
        clip = comps.text_encoders["text_encoder"](ids[batch_key("tokenizer")].to(device))
        t5 = comps.text_encoders["text_encoder_2"](ids[batch_key(self.t5_tokenizer)].to(device))[0]
        return {"text": t5, "pooled": clip.pooler_output}

    def conditioning(
        self, encoded: Mapping[str, torch.Tensor], time_ids: torch.Tensor | None
    ) -> dict[str, Any]:
        """The text sequence, the pooled projection and the text's ids: zeros, one row per token, as
        ``FluxPipeline.encode_prompt`` makes them (the image's ids are the objective's: they follow the
        latents' size)."""
        import torch

        hidden = encoded["text"]
        txt_ids = torch.zeros(hidden.shape[1], 3, device=hidden.device, dtype=hidden.dtype)
        pooled = encoded["pooled"].to(hidden.dtype)
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled, "txt_ids": txt_ids}

    def objective(
        self, noise_scheduler: Any, prediction_type: str | None = None, flow: Any = None
    ) -> Objective:
        """SD3's flow matching on packed latents, with the guidance value ``model.flow_matching`` gives
        (for a transformer with a guidance embedding: FLUX.1-dev)."""
        from sdcluster.models.objectives import PackedFlowMatching

        super().objective(noise_scheduler, prediction_type, flow)  # SD3's refusals
        return PackedFlowMatching(noise_scheduler, flow)


FAMILIES: dict[str, type[Family]] = {
    SD1.pipeline_name: SD1,
    SDXL.pipeline_name: SDXL,
    SD3.pipeline_name: SD3,
    FLUX.pipeline_name: FLUX,
}


def family_of_index(index: Mapping[str, Any], where: str) -> Family:
    """The family of a pipeline by its ``model_index.json``; any other pipeline is refused with the fix."""
    name = index.get("_class_name")
    if name not in FAMILIES:
        raise ValueError(
            f"{where} is a {name} pipeline; sdcluster trains and generates with "
            f"{', '.join(FAMILIES)} (Stable Diffusion 1.x/2.x, SDXL, 3.x and FLUX.1)"
        )
    return FAMILIES[name]()


def family_of_folder(folder: Path) -> Family:
    """The family of a pipeline folder, read from its ``model_index.json`` with ``json`` (the login node's
    checks and the embedded model's completeness test do not import diffusers for it)."""
    index = json.loads((folder / "model_index.json").read_text())
    return family_of_index(index, str(folder))


def family_of_pipeline(pipe: Any) -> Family:
    """The family of a loaded pipeline, by its class name (as ``model_index.json`` records it)."""
    return family_of_index({"_class_name": type(pipe).__name__}, type(pipe).__name__)


def denoiser_of(pipe: Any) -> Any:
    """A loaded pipeline's denoiser (its family's :attr:`Family.denoiser_name` component)."""
    return getattr(pipe, family_of_pipeline(pipe).denoiser_name)


def family_of(source: str, revision: str | None = None) -> Family:
    """The family of the pipeline at ``source`` (a folder, or a hub id read through the hub's cache)."""
    from diffusers import DiffusionPipeline

    return family_of_index(DiffusionPipeline.load_config(source, revision=revision), source)
