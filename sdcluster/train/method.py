"""What a run trains, chosen once from ``train.method``: every denoiser weight, or LoRA adapters.

The trainer, loop, checkpointer, EMA and export ask the method (the :class:`Method` protocol; full
fine-tuning and LoRA are its two implementations, side by side) instead of branching on its name:

- :meth:`prepare` freezes, casts and adapts the loaded components (before they move to the device);
- :attr:`models` are what ``accelerator.prepare`` wraps (the denoiser first), :meth:`named_parameters` what is
  trained, in one fixed order: the optimizer, the gradient clipping, the EMA and its checkpoint file see
  exactly these, so a LoRA run's EMA and optimizer state are adapter-sized;
- :meth:`param_groups` are the optimizer's groups (the text encoder's adapters have their own rate);
- :meth:`register_checkpoint_hooks` decides what ``accelerator.save_state`` writes for the models;
- :meth:`export` writes the run's result (a diffusers pipeline, or the standard LoRA file).

A model family (:mod:`sdcluster.models.family`: SD 1.x/2.x or SDXL) says which text encoders there are, how
the denoiser is conditioned and how the pipeline is built and saved; the methods work on whichever family
the loaded model has. ``train.method`` is read by name only through :data:`METHODS` (``method_class``,
``make_method``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file

from sdcluster.config import Config
from sdcluster.models.family import Family
from sdcluster.models.load import half_dtype
from sdcluster.train.loss import model_inputs

if TYPE_CHECKING:
    from accelerate import Accelerator

    from sdcluster.models.load import Components
    from sdcluster.train.trainer import Trainer

log = logging.getLogger("sdcluster")


def weight_dtype(accelerator: Accelerator) -> torch.dtype | None:
    """The half type mixed precision computes in, or None in float32 (:func:`half_dtype`'s mapping)."""
    return half_dtype(accelerator.mixed_precision)


@runtime_checkable
class Method(Protocol):
    """What a run trains, saves and exports; see the module docstring for when each part is asked."""

    name: ClassVar[str]
    trains_adapters: ClassVar[bool]
    """Whether it trains adapters rather than the denoiser's own weights: what the schema says of its name
    (:attr:`sdcluster.config.TrainConfig.trains_adapters`, read on the login node without this module)."""
    cfg: Config
    trains_text_encoder: bool
    """Whether text encoders are trained (then the latent cache's encodings would be stale)."""
    models: list[torch.nn.Module]
    prepared: list[torch.nn.Module]  # ``models`` as accelerate prepared them (DDP wrappers on N processes)

    def prepare(self, comps: Components, accelerator: Accelerator) -> None: ...
    def adapt(self, denoiser: torch.nn.Module) -> None: ...
    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]: ...
    def param_groups(self, lr: float) -> list[dict[str, Any]]: ...
    def model_inputs(
        self, comps: Components, batch: dict[str, torch.Tensor], device: Any, gen: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, Any]]: ...
    def register_checkpoint_hooks(self, accelerator: Accelerator) -> None: ...
    def export(self, t: Trainer) -> Path: ...


def _inputs(
    method: Method, comps: Components, batch: dict[str, torch.Tensor], device: Any, gen: torch.Generator
) -> tuple[torch.Tensor, dict[str, Any]]:
    """(latents, the denoiser's conditioning) of a batch from the encoders (or the latent cache); text
    encoders whose adapters are trained run with autograd, through their prepared (DDP) wrappers: a forward
    that bypasses the wrapper leaves their gradients unaveraged, and the ranks drift apart. Captions are
    dropped at ``data.caption_dropout`` whatever the method (a trained text encoder then sees ``""``)."""
    if method.trains_text_encoder:
        encoders = dict(zip(comps.text_encoders, method.prepared[1:], strict=True))
        comps = dataclasses.replace(comps, text_encoders=encoders)
    dropout = method.cfg.data.caption_dropout
    return model_inputs(comps, batch, device, gen, method.trains_text_encoder, dropout)


class FullFineTune:
    """Every denoiser weight is trained, in float32 (autocast computes in half precision when asked)."""

    name: ClassVar[str] = "full"
    trains_adapters: ClassVar[bool] = False

    def __init__(self, cfg: Config, family: Family) -> None:
        self.cfg = cfg
        self.family = family
        self.trains_text_encoder = False
        self.models: list[torch.nn.Module] = []
        self.prepared: list[torch.nn.Module] = []

    @staticmethod
    def finds_unused_parameters(cfg: Config) -> bool:
        """Whether DDP must be told that some trained parameters get no gradient: never, all of the denoiser
        takes part in its forward."""
        return False

    def prepare(self, comps: Components, accelerator: Accelerator) -> None:
        comps.denoiser.train()
        self.models = [comps.denoiser]

    def adapt(self, denoiser: torch.nn.Module) -> None:
        """Nothing to add to a fresh copy of the denoiser (FSDP's gathered one): its weights are trained."""

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The denoiser's parameters by their own names (the EMA file of full runs has always used them)."""
        return list(self.models[0].named_parameters())

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": [p for _, p in self.named_parameters()], "lr": lr}]

    def model_inputs(
        self, comps: Components, batch: dict[str, torch.Tensor], device: Any, gen: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        return _inputs(self, comps, batch, device, gen)

    def register_checkpoint_hooks(self, accelerator: Accelerator) -> None:
        """Nothing to change: ``save_state`` writes the whole denoiser, which is what is trained."""

    def export(self, t: Trainer) -> Path:
        from sdcluster.train.export import export_pipeline

        return export_pipeline(
            t.paths.model,
            self.family,
            t.comps.source,
            t.accelerator.unwrap_model(t.denoiser),
            t.ema,
            params=t.params,
            objective=t.objective,
            model=self.cfg.model,
            origin=t.comps.origin,
        )


class LoRA:
    """Low-rank adapters (``peft``) on the denoiser's attention projections, optionally the text encoders'.

    As in diffusers' ``train_text_to_image_lora.py``: the base weights are frozen and, under mixed
    precision, cast to the half type (the memory saving LoRA is chosen for); the adapters stay in float32
    (``cast_training_params``), so the optimizer updates full-precision numbers.
    """

    name: ClassVar[str] = "lora"
    trains_adapters: ClassVar[bool] = True

    def __init__(self, cfg: Config, family: Family) -> None:
        self.cfg = cfg
        self.family = family
        self.lora = cfg.train.lora
        self.trains_text_encoder = self.lora.text_encoder_lr is not None
        self.models: list[torch.nn.Module] = []
        self.prepared: list[torch.nn.Module] = []
        self.prefixes: list[str] = []

    @staticmethod
    def finds_unused_parameters(cfg: Config) -> bool:
        """SDXL conditions on the first text encoder's penultimate layer: the adapters of its last layer get
        no gradient, which DDP refuses unless told (diffusers' SDXL LoRA script sets the same flag)."""
        return cfg.train.lora.text_encoder_lr is not None

    def model_inputs(
        self, comps: Components, batch: dict[str, torch.Tensor], device: Any, gen: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        return _inputs(self, comps, batch, device, gen)

    def _adapter_config(self, targets: list[str] | tuple[str, ...]) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.lora.rank,
            lora_alpha=self.lora.alpha if self.lora.alpha is not None else self.lora.rank,
            lora_dropout=self.lora.dropout,
            init_lora_weights="gaussian",  # diffusers' choice: B = 0, so step 0 is exactly the base model
            target_modules=list(targets),
        )

    def prepare(self, comps: Components, accelerator: Accelerator) -> None:
        from diffusers.training_utils import cast_training_params

        dtype = weight_dtype(accelerator)
        encoders = comps.text_encoders if self.trains_text_encoder else {}
        modules = [comps.denoiser, *encoders.values()]
        for module in modules:
            module.requires_grad_(False)
            if dtype is not None:
                module.to(dtype=dtype)
        # The adapters' initial A matrices are random: seeded from train.seed in a forked RNG, so they are
        # the same in every job of the run (resume rebuilds them before loading) and the global stream is
        # left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.train.seed)
            self.adapt(comps.denoiser)
            for encoder in encoders.values():
                # peft's own injection, not transformers' add_adapter: that one refuses peft < 0.22 under
                # transformers 5, for the same layers and the same state dict.
                from peft import inject_adapter_in_model

                inject_adapter_in_model(self._adapter_config(self.family.text_encoder_targets), encoder)
        cast_training_params(modules, dtype=torch.float32)
        for module in modules:
            module.train()
        self.models = modules
        self.prefixes = [f"{name}." for name in encoders]  # names each encoder's tensors in the EMA file
        count = sum(p.numel() for _, p in self.named_parameters())
        log.info("LoRA rank %d on %s: %d trainable parameters", self.lora.rank, self._where(), count)

    def adapt(self, denoiser: torch.nn.Module) -> None:
        """Give a fresh copy of the denoiser (FSDP's gathered one) this run's adapters, to load into."""
        denoiser.add_adapter(self._adapter_config(self.lora.target_modules))

    def _where(self) -> str:
        where = self.family.denoiser_name
        return f"{where} + {' + '.join(p[:-1] for p in self.prefixes)}" if self.prefixes else where

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The adapters: the denoiser's by their own names, a text encoder's prefixed with its name
        (``text_encoder.``, SDXL's second ``text_encoder_2.``)."""
        found = [(n, p) for n, p in self.models[0].named_parameters() if p.requires_grad]
        for prefix, module in zip(self.prefixes, self.models[1:], strict=True):
            found += [(prefix + n, p) for n, p in module.named_parameters() if p.requires_grad]
        return found

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        denoiser = [p for p in self.models[0].parameters() if p.requires_grad]
        groups = [{"params": denoiser, "lr": lr}]
        if self.trains_text_encoder:
            scale = lr / self.cfg.optim.lr  # optim.scale_lr scales both rates alike
            text = [p for module in self.models[1:] for p in module.parameters() if p.requires_grad]
            groups.append({"params": text, "lr": self.lora.text_encoder_lr * scale})
        return groups

    def register_checkpoint_hooks(self, accelerator: Accelerator) -> None:
        """``save_state`` writes only the adapters of each prepared model (a checkpoint the size of the
        adapters, not of the denoiser), and ``load_state`` loads them back, refusing any other set of names.

        accelerate's own hooks for this (diffusers' examples use them); the file names stay accelerate's
        (``model.safetensors``, ``model_1.safetensors``), so the checkpoint format is unchanged.
        """

        def save_adapters(models: list[Any], weights: list[dict], output_dir: str) -> None:
            for i, model in enumerate(models):
                module = accelerator.unwrap_model(model)
                weights[i] = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}

        def load_adapters(models: list[Any], input_dir: str) -> None:
            while models:  # accelerate loads what is left in the list: nothing, the adapters are ours
                index = len(models) - 1
                module = accelerator.unwrap_model(models.pop())
                name = "model.safetensors" if index == 0 else f"model_{index}.safetensors"
                _load_trainable(module, Path(input_dir) / name)

        accelerator.register_save_state_pre_hook(save_adapters)
        accelerator.register_load_state_pre_hook(load_adapters)

    def export(self, t: Trainer) -> Path:
        from sdcluster.train.export import export_fused, export_lora

        denoiser = t.accelerator.unwrap_model(t.denoiser)
        text_encoders = t.comps.text_encoders if self.trains_text_encoder else {}
        origin = t.comps.origin
        lora_dir = export_lora(t.paths.lora, self.family, denoiser, text_encoders, t.ema, t.params, origin)
        if self.lora.fuse_export:
            source, model = t.comps.source, self.cfg.model
            export_fused(t.paths.model, self.family, source, lora_dir, t.objective, model, origin)
        return lora_dir


def _load_trainable(module: torch.nn.Module, file: Path) -> None:
    """Copy a checkpoint's adapter tensors into ``module``; the names must be exactly its trainable ones."""
    tensors = load_file(str(file))
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if set(tensors) != set(trainable):
        missing, extra = sorted(set(trainable) - set(tensors)), sorted(set(tensors) - set(trainable))
        raise RuntimeError(
            f"{file} does not hold this run's adapters (missing {missing[:3]}, unexpected {extra[:3]}): "
            "it was saved with other train.method/train.lora settings"
        )
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(tensors[name].to(param.device, param.dtype))


METHODS: dict[str, type[FullFineTune] | type[LoRA]] = {FullFineTune.name: FullFineTune, LoRA.name: LoRA}
"""``train.method`` -> the method's class."""


def method_class(cfg: Config) -> type[FullFineTune] | type[LoRA]:
    """The class of the method ``train.method`` names (the schema allows only these names)."""
    return METHODS[cfg.train.method]


def make_method(cfg: Config, family: Family) -> Method:
    """The method ``train.method`` names, for the loaded model's family."""
    return method_class(cfg)(cfg, family)
