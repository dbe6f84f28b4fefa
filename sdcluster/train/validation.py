"""Validation during training: a held-out loss that ranks runs, and images for fixed prompts and seeds.

Everything that could make two runs' numbers differ for reasons other than their weights is fixed: the
images (``data.holdout``, a split that ignores ``train.seed``), their crop (center, no flip), the timesteps,
the noise of each (image, timestep) pair, the VAE latent (posterior mean) and each prompt's seed. A run
with another learning rate or seed is therefore measured on exactly the same problem, and the same weights
give the same number at any step.

Every rank calls :func:`run_validation` (it is collective): the loss pairs and the prompts are dealt out
(item i to rank i % world), so each rank does about 1/world of the work and the ranks arrive at the one
all-reduce and the one barrier at about the same time instead of idling while rank 0 does it all (the
NCCL-timeout stall of field notes, pain point 14).

    run_validation(trainer, trainer.step)   # every train.validate_every steps and once at the end
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from sdcluster.generate.images import full_size_grid, save_png_atomic
from sdcluster.generate.plan import item_seed
from sdcluster.generate.render import PromptEmbeddings
from sdcluster.train import metrics
from sdcluster.train.ema import ema_weights
from sdcluster.train.loss import conditioning, scale_latents, step_generator

if TYPE_CHECKING:
    from sdcluster.config import Config, GenerateConfig
    from sdcluster.data.text_store import TextStore
    from sdcluster.train.trainer import Trainer

log = logging.getLogger("sdcluster")

NUM_TIMESTEPS = 4  # loss timesteps, spread over the whole noise range: low, mid and high noise all count
NOISE_SEED = 0x5EED_0FF  # not train.seed: two runs with different seeds must see the same noise
IMAGE_SEED = 0  # prompt i always starts from item_seed(IMAGE_SEED, i, 0), at every step of every run


@dataclass(frozen=True)
class LossImages:
    """The images the validation loss is measured on, center-cropped and tokenized."""

    indices: list[int]  # rows of the dataset (sorted by file name, see load_captioned_images)
    names: list[str]
    held_out: bool  # False: data.holdout=0, the loss is on training images
    pixel_values: torch.Tensor
    text: dict[str, torch.Tensor]  # token ids by batch key, and SDXL's time ids
    captions: list[str]  # what the text store holds their encodings by

    def describe(self) -> str:
        if self.held_out:
            return f"{len(self.indices)} held-out images"
        return f"first {len(self.indices)} training images, data.holdout=0"


def loss_images(cfg: Config, tokenizers: Any) -> LossImages:
    """The held-out images, or the first ``FALLBACK_IMAGES`` (:func:`~sdcluster.data.sources.loss_rows`)
    when nothing is held out.

    The crop is the center one and there is no flip whatever ``train.center_crop/random_flip`` say, so the
    pixels do not depend on an augmentation seed.
    """
    from sdcluster.data.dataset import TrainImages, collate
    from sdcluster.data.snapshot import readable
    from sdcluster.data.sources import column, loss_rows

    dataset, indices, held = loss_rows(cfg)
    subset = readable(cfg, dataset.select(indices))  # only these images are read (and checked)
    images = TrainImages(subset, tokenizers, cfg.train.resolution, True, False, cfg.data.caption_column)
    batch = collate([images[(k, 0)] for k in range(len(indices))])
    names = list(subset["file_name"])
    pixels = batch.pop("pixel_values")
    captions = list(column(subset, cfg.data.caption_column))
    return LossImages(indices, names, held, pixels, batch, captions)


def _store(t: Trainer) -> TextStore | None:
    """Where validation reads its text encodings, or None where the text encoders are trained (then only
    running them gives the adapted encodings)."""
    from sdcluster.data.text_store import TextStore

    return None if t.method.trains_text_encoder else TextStore.of(t.cfg, t.comps, t.accelerator.device)


def fixed_timesteps(num_train_timesteps: int, count: int = NUM_TIMESTEPS) -> list[int]:
    """The midpoints of ``count`` equal bins of the range (125, 375, 625, 875 for 1000 and 4)."""
    return [(2 * k + 1) * num_train_timesteps // (2 * count) for k in range(count)]


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) inside, the previous mode afterwards, even if validation fails."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _encode(
    t: Trainer, images: LossImages, pos: int, store: TextStore | None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Latents from the VAE posterior *mean* (a sample would add noise that no seed controls) and the
    denoiser's conditioning (text, and SDXL's size and crop): the caption's encodings from the ``store``
    (the very numbers its encoders give, so a cached run measures what an encoding one does), else by
    running the (trained) text encoders."""
    vae, device = t.comps.vae, t.accelerator.device
    pixels = images.pixel_values[pos : pos + 1].to(device, vae.dtype)
    mean = vae.encode(pixels).latent_dist.mean
    latents = scale_latents(mean, vae.config.scaling_factor, vae.config.shift_factor)
    text = {k: v[pos : pos + 1] for k, v in images.text.items()}
    if store is not None:
        text |= store.caption(images.captions[pos])
    return latents, conditioning(t.comps, text, device)


def _pair_loss(
    t: Trainer, denoiser: torch.nn.Module, latents: torch.Tensor, cond: dict[str, Any], row: int, step: int
) -> torch.Tensor:
    """Plain MSE at one fixed timestep with the pair's own noise.

    Unweighted and without noise offset on purpose: sweeping ``snr_gamma`` or ``noise_offset`` changes the
    training objective but must not change the ruler the runs are compared with.
    """
    gen = step_generator(NOISE_SEED, row, step)  # keyed by the image's row, so holdout changes nothing else
    noise = torch.randn(tuple(latents.shape), generator=gen).to(latents.device, latents.dtype)
    timesteps = torch.tensor([step], device=latents.device)
    noisy, target = t.objective.noised(latents, noise, timesteps)
    with t.accelerator.autocast():
        pred = t.objective.predict(denoiser, noisy, timesteps, cond)
    return F.mse_loss(pred.float(), target.float()).double()


def validation_loss(t: Trainer, images: LossImages | None = None, use_ema: bool = False) -> float:
    """The mean loss over every (image, fixed timestep) pair; collective: every rank must call it.

    Pair i is computed by rank i % world, one pair at a time (a batch's rounding would depend on how many
    ranks share the work); one sum all-reduce combines the shares. The trained weights are measured, like
    the training loss they are plotted with; ``use_ema=True`` measures the EMA weights instead.
    """
    acc = t.accelerator
    if images is None:
        images = loss_images(t.cfg, t.comps.family.tokenizers(t.comps))
    steps = fixed_timesteps(t.objective.num_timesteps)
    pairs = [(pos, step) for pos in range(len(images.indices)) for step in steps]
    # never the DDP wrapper: its forward may broadcast buffers (a collective)
    denoiser = acc.unwrap_model(t.denoiser)
    total = torch.zeros((), dtype=torch.float64, device=acc.device)
    encoded: dict[int, tuple[torch.Tensor, dict[str, Any]]] = {}
    ema = t.ema if use_ema else None
    store = _store(t)
    with _eval_mode(denoiser), _text_eval(t), ema_weights(ema, t.params), torch.no_grad():
        for pos, step in pairs[acc.process_index :: acc.num_processes]:
            if pos not in encoded:
                encoded[pos] = _encode(t, images, pos, store)
            total += _pair_loss(t, denoiser, *encoded[pos], images.indices[pos], step)
    return acc.reduce(total, reduction="sum").item() / len(pairs)


@contextlib.contextmanager
def _text_eval(t: Trainer) -> Iterator[None]:
    """Every loaded text encoder in eval mode (no adapter dropout) inside."""
    with contextlib.ExitStack() as stack:
        for encoder in t.comps.text_encoders.loaded().values():
            stack.enter_context(_eval_mode(encoder))
        yield


def _pipeline(t: Trainer, denoiser: torch.nn.Module, text: bool = True) -> Any:
    """A pipeline around the in-memory components: nothing reloaded from disk, no safety checker, no bars;
    ``text=False``: without the text encoders not loaded (its prompts come as embeddings)."""
    comps = t.comps
    with warnings.catch_warnings():  # it fixes old scheduler settings (clip_sample) itself, warning each time
        warnings.filterwarnings("ignore", "The configuration file of this scheduler", FutureWarning)
        sampler = comps.family.sampler(t.cfg.generate.scheduler, comps.noise_scheduler.config)
        pipe = comps.family.pipeline(comps, denoiser, sampler, text=text)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _StoredPrompts(PromptEmbeddings):
    """Validation prompts' embeddings from the text store; a pipeline with the text encoders is made (and
    they are loaded) only for a prompt the store lacks."""

    def __init__(
        self, t: Trainer, denoiser: torch.nn.Module, pipe: Any, store: TextStore, gen: GenerateConfig
    ) -> None:
        super().__init__(pipe, gen.negative_prompt, gen.guidance_scale)
        self.store = store
        self._encoding: Any = None
        self._make = lambda: _pipeline(t, denoiser)

    def _encoding_pipe(self) -> Any:
        if self._encoding is None:
            self._encoding = self._make()
        return self._encoding

    def encode(self, prompt: str, negative: str | None, guidance: bool) -> dict[str, Any]:
        return self.store.prompt(prompt, negative, guidance, self._encoding_pipe)


def image_folder(t: Trainer, step: int) -> Path:
    return t.paths.validation / f"step-{step:08d}"


def validation_images(t: Trainer, step: int) -> Path | None:
    """Render ``train.validation_prompts`` (EMA weights when EMA is on); collective: one barrier.

    Prompt i is rendered by rank i % world, alone in its batch so its pixels do not depend on the world
    size, at ``train.resolution`` with ``train.validation_steps`` steps and ``generate``'s scheduler,
    guidance and negative prompt. Returns the folder, or None when there are no prompts.
    """
    from sdcluster.generate.render import render

    cfg, acc = t.cfg, t.accelerator
    prompts = cfg.train.validation_prompts
    if not prompts:
        return None
    folder = image_folder(t, step)
    folder.mkdir(parents=True, exist_ok=True)
    size = cfg.train.resolution
    gen = dataclasses.replace(cfg.generate, steps=cfg.train.validation_steps, height=size, width=size)
    denoiser = acc.unwrap_model(t.denoiser)
    store = _store(t)
    with _eval_mode(denoiser), _text_eval(t), ema_weights(t.ema, t.params):
        pipe = _pipeline(t, denoiser, text=store is None)
        embeddings = None if store is None else _StoredPrompts(t, denoiser, pipe, store, gen)
        for i in range(acc.process_index, len(prompts), acc.num_processes):
            seed = item_seed(IMAGE_SEED, i, 0)
            with acc.autocast():
                image = render(pipe, [prompts[i]], [seed], gen, embeddings)[0]
            record = {"step": step, "prompt": prompts[i], "seed": seed, "steps": gen.steps}
            save_png_atomic(image, folder / f"p{i:02d}.png", record)
    acc.wait_for_everyone()
    if acc.is_main_process:
        full_size_grid([folder / f"p{i:02d}.png" for i in range(len(prompts))], folder / "grid.png")
    return folder


def run_validation(t: Trainer, step: int) -> dict[str, Any]:
    """Loss and images at ``step``; one log line; rank 0 appends ``{step, val_loss, time}`` to metrics.jsonl.

    Collective: every rank must call it at the same step. Returns the record plus ``images`` (folder or
    None) and ``seconds``.
    """
    start = time.monotonic()
    images = loss_images(t.cfg, t.comps.family.tokenizers(t.comps))
    val_loss = validation_loss(t, images)
    folder = validation_images(t, step)
    if not t.comps.text_encoders.steps_run_them:  # loaded for a text the store lacked: not kept for steps
        t.comps.text_encoders.release()
    seconds = time.monotonic() - start
    log.info(
        "validation step %d | val_loss %.4f (%s) | images %s | %.1f s",
        step,
        val_loss,
        images.describe(),
        folder if folder else "none (train.validation_prompts is empty)",
        seconds,
    )
    record = {"step": step, "val_loss": val_loss, "time": time.time()}
    if t.accelerator.is_main_process:
        metrics.append(t.paths.metrics, record)
    return {**record, "images": folder, "seconds": seconds}
