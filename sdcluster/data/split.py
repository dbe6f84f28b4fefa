"""Which images are held out of training for the validation loss.

The split depends only on the number of images and ``holdout``, never on ``train.seed``, so runs with
different seeds or learning rates are validated on the same images and their losses compare.
"""

from __future__ import annotations

import random

SPLIT_SEED = 20231103


def holdout_split(num_images: int, holdout: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices), both sorted; raise if nothing would be left to train on."""
    if holdout >= num_images:
        raise ValueError(
            f"data.holdout={holdout} leaves nothing to train on ({num_images} images). "
            f"Fix: use data.holdout < {num_images}, or 0"
        )
    order = list(range(num_images))
    random.Random(SPLIT_SEED).shuffle(order)
    held = sorted(order[:holdout])
    return sorted(set(range(num_images)) - set(held)), held


def training_indices(num_images: int, holdout: int, max_samples: int | None = None) -> list[int]:
    """The rows a run trains on: the training split, cut to its first ``max_samples`` (``data.max_samples``)
    in row order (file names), so the same folder and settings always train on the same images."""
    train, _ = holdout_split(num_images, holdout)
    return train if max_samples is None else train[:max_samples]
