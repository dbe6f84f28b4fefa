"""Load a captioned image folder and turn rows into training tensors.

Augmentation is a pure function of ``(index, aug_seed)``: no global RNG, no per-worker state. The sampler
hands out those keys, so a resumed job (or a different ``num_workers``) sees exactly the same batches.
The transforms follow the seed's ``train_text_to_image.py`` (resize the shorter side, center or random
crop, random horizontal flip, scale to [-1, 1]) but are written with PIL + numpy, not torchvision.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps

from sdcluster.data.buckets import Bucket, Size, assign, cover_size, upright_size_of
from sdcluster.data.metadata import listed_rows
from sdcluster.data.sources import column
from sdcluster.models.family import TIME_IDS


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars or info lines from ``datasets``: they turn into noise in a SLURM log file."""
    verbosity = datasets.logging.get_verbosity()
    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()


def _rows(images: list[str], captions: list[str], names: list[str], caption_column: str) -> Iterator[dict]:
    """The dataset's rows, for ``datasets.Dataset.from_generator`` (its arguments key the Arrow cache)."""
    for image, caption, name in zip(images, captions, names, strict=True):
        yield {"image": image, caption_column: caption, "file_name": name}


def load_captioned_images(
    path: Path | str,
    caption_column: str = "text",
    cache_dir: Path | str | None = None,
    clean: tuple[Path | str, int] | None = None,
) -> datasets.Dataset:
    """A dataset with ``image``, the caption column and ``file_name``, rows sorted by file name.

    The rows are exactly those :func:`~sdcluster.data.reader.scan` reads for ``validate``: the same reader
    decides which lines count, and the job refuses what validate refuses by name and line (an empty caption
    aside); only validate decodes the images. We do not hand the folder to ``datasets``' imagefolder builder:
    it opens every path through fsspec, which reads ``::`` in any file of the folder (``notes::v1.txt``) as a
    chained URL and dies. Here each image is an absolute local path in an ``Image`` feature, which
    ``datasets`` decodes with Pillow directly, so no URL syntax is ever parsed. Sorting by name makes the row
    index (which the sampler and checkpoints refer to) independent of how the file was edited; images the
    metadata does not list are not read. ``clean``: ``(cache_root, data.max_pixels)`` of a job, whose launch
    decoded the images and remembered the clean ones: those unchanged since are not opened again.
    """
    folder = Path(path)
    rows = listed_rows(folder, caption_column, clean)  # the reader's rows, sorted by name
    root = os.path.abspath(folder)  # absolute: a relative "a::b.png" would parse as scheme "a"
    names = [row.file_name for row in rows]
    images = [os.path.join(root, name) for name in names]
    return rows_table(images, names, [row.caption for row in rows], caption_column, cache_dir)


def rows_table(
    images: list[str],
    names: list[str],
    captions: list[str],
    caption_column: str = "text",
    cache_dir: Path | str | None = None,
    fingerprint: str | None = None,
) -> datasets.Dataset:
    """The ``datasets`` table of checked image files ``images`` (absolute paths) named ``names`` in their
    folders, with ``captions``: ``image``, the caption column and ``file_name`` (:func:`load_captioned_images`
    says why so). ``fingerprint``: what names this table's Arrow cache, when the caller knows it (a pinned
    snapshot's rows); else ``datasets`` hashes the columns (5 s at 100,000 rows)."""
    text = datasets.Value("string")
    features = datasets.Features({"image": datasets.Image(), caption_column: text, "file_name": text})
    columns = {
        "images": images,
        "captions": captions,
        "names": names,
        "caption_column": caption_column,
    }
    with _quiet_datasets():
        return datasets.Dataset.from_generator(
            _rows,
            features=features,
            gen_kwargs=columns,
            cache_dir=str(cache_dir) if cache_dir else None,
            fingerprint=fingerprint,
        )


Target = int | Size
"""What an image is cropped to: ``train.resolution`` (a square) or a bucket's ``(width, height)``."""


def target_size(target: Target) -> Size:
    """``(width, height)`` of a crop target: an int is a square."""
    return (target, target) if isinstance(target, int) else (int(target[0]), int(target[1]))


def resized_size(size: Size, resolution: Target) -> Size:
    """The size an upright image of ``size`` is resized to before it is cropped to ``resolution``: the
    shorter side equal to it for a square, the smallest size that covers a bucket's."""
    return cover_size(size, target_size(resolution))


def time_ids(
    original: Size, resized: Size, resolution: Target, left: int, top: int, flip: bool
) -> torch.Tensor:
    """SDXL's size and crop conditioning (``add_time_ids``) of one example: original height and width, crop
    top and left, target height and width (a bucket's, with buckets on).

    As in diffusers' SDXL training script, which flips before it crops: the crop's left edge is measured in
    the mirrored image, so a mirrored crop reports ``width - target width - left``.
    """
    width, height = target_size(resolution)
    crop_left = resized[0] - width - left if flip else left
    numbers = [original[1], original[0], top, crop_left, height, width]
    return torch.tensor(numbers, dtype=torch.float32)


def resize_for_crop(image: Image.Image, resolution: Target) -> Image.Image:
    """Upright RGB image resized to cover ``resolution`` (the first half of :func:`augment`)."""
    image = ImageOps.exif_transpose(image).convert("RGB")
    return image.resize(resized_size(image.size, resolution), Image.Resampling.BILINEAR)


def crop_and_flip(
    size: Size, resolution: Target, center_crop: bool, random_flip: bool, aug_seed: int
) -> tuple[int, int, bool]:
    """``(left, top, flip)`` that :func:`augment` applies to a resized image of ``size``.

    A function of its own so the latent cache can tell which cached variant an ``aug_seed`` selects
    without decoding the image: the two can never disagree.
    """
    width, height = target_size(resolution)
    rng = random.Random(aug_seed)
    if center_crop:
        left = round((size[0] - width) / 2.0)
        top = round((size[1] - height) / 2.0)
    else:
        left = rng.randint(0, size[0] - width)
        top = rng.randint(0, size[1] - height)
    return left, top, random_flip and rng.random() < 0.5


def crop_to_tensor(resized: Image.Image, resolution: Target, left: int, top: int, flip: bool) -> torch.Tensor:
    """A float32 ``(3, H, W)`` tensor in [-1, 1] of one crop (mirrored when ``flip``) of a resized image."""
    width, height = target_size(resolution)
    image = resized.crop((left, top, left + width, top + height))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def augment(
    image: Image.Image, resolution: Target, center_crop: bool, random_flip: bool, aug_seed: int
) -> torch.Tensor:
    """A float32 ``(3, H, W)`` tensor in [-1, 1]; the same arguments always give the same tensor."""
    resized = resize_for_crop(image, resolution)
    left, top, flip = crop_and_flip(resized.size, resolution, center_crop, random_flip, aug_seed)
    return crop_to_tensor(resized, resolution, left, top, flip)


def tokenize_captions(tokenizers: Any, captions: list[str]) -> dict[str, torch.Tensor]:
    """``(N, L)`` token ids padded to the model's length, by batch key: ``input_ids`` (and SDXL's
    ``input_ids_2``). ``tokenizers`` is one tokenizer or a family's mapping of them
    (:meth:`sdcluster.models.family.SD1.tokenizers`)."""
    if not isinstance(tokenizers, Mapping):
        tokenizers = {"input_ids": tokenizers}
    return {
        key: tok(
            captions,
            padding="max_length",
            truncation=True,
            max_length=tok.model_max_length,
            return_tensors="pt",
        ).input_ids.long()
        for key, tok in tokenizers.items()
    }


class TrainImages(torch.utils.data.Dataset):
    """Training examples addressed by ``(index, aug_seed)`` keys from :class:`StepSampler`.

    Captions are tokenized once here (they never change), so workers only decode and augment images,
    and the tokenizer does not have to be pickled into DataLoader workers. ``tokenizer`` is one tokenizer or
    a family's mapping of them (SDXL's two). Every example carries its ``time_ids`` (SDXL's size and crop
    conditioning, ignored by SD 1.x). With ``buckets`` (``data.buckets``) each image is cropped to the
    bucket closest to its aspect ratio instead of the ``resolution`` square.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        tokenizer: Any,
        resolution: int,
        center_crop: bool,
        random_flip: bool,
        caption_column: str = "text",
        buckets: tuple[Bucket, ...] | None = None,
    ) -> None:
        if caption_column not in dataset.column_names:
            raise ValueError(
                f"caption column {caption_column!r} not in dataset columns {dataset.column_names}"
            )
        captions = column(dataset, caption_column)  # one Arrow slice, not a row-by-row lazy column
        bad = [i for i, c in enumerate(captions) if not isinstance(c, str)]
        if bad:
            raise ValueError(f"rows {bad} have no caption string; run `python -m sdcluster.data validate`")
        self.dataset = dataset
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.buckets = buckets
        self.token_ids = tokenize_captions(tokenizer, captions)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        if not isinstance(key, tuple):
            raise TypeError(
                f"TrainImages takes (index, aug_seed) keys, got {key!r}; use sampler=StepSampler(...)"
            )
        index, aug_seed = key
        image = self.dataset[int(index)]["image"]
        original = upright_size_of(image)
        res: Target = self.resolution
        if self.buckets is not None:
            res = self.buckets[assign(original, self.buckets)].size
        resized = resize_for_crop(image, res)
        left, top, flip = crop_and_flip(resized.size, res, self.center_crop, self.random_flip, aug_seed)
        example = {
            "pixel_values": crop_to_tensor(resized, res, left, top, flip),
            TIME_IDS: time_ids(original, resized.size, res, left, top, flip),
        }
        return example | {key: ids[index].clone() for key, ids in self.token_ids.items()}


def collate(examples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack examples key by key: ``pixel_values`` (B, 3, R, R) float32 and ``input_ids`` (B, L) long from
    :class:`TrainImages`, ``posterior`` and ``text`` (and ``pooled``) from the latent cache's examples,
    ``time_ids`` (B, 6) from both."""
    return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}
