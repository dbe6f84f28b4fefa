"""Training never reads the images validation holds out, with or without the latent cache.

The held-out names are not recomputed here: they are what validation itself reads
(``validation.loss_images(...).names``). What training reads is observed, not predicted: every example the
loop draws (``TrainImages`` or the latent cache's ``CachedExamples``), every image decoded for a training
step and every image encoded into the latent cache is recorded by file name while a short run trains.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from sdcluster.data import dataset as dataset_module
from sdcluster.data import latent_build
from sdcluster.data.dataset import TrainImages
from sdcluster.data.latent_cache import CachedExamples
from sdcluster.train import validation
from sdcluster.train.loop import train
from tests.conftest import copy_sample

HOLDOUT = 3


def _copy_sample(dest: Path, tag: str) -> Path:
    """The shipped sample with every caption tagged, so this run builds a latent-cache entry of its own."""
    return copy_sample(dest, row=lambda row: {**row, "text": f"{row['text']} ({tag})"})


class Recorder:
    """File names read while training (``phase == "train"``) and while validating, kept apart."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.phase = "train"
        self.drawn: dict[str, set[str]] = defaultdict(set)  # examples the loader handed out
        self.decoded: dict[str, set[str]] = defaultdict(set)  # images decoded into pixels (step or cache)
        self.validation_names: list[list[str]] = []
        self.cached_runs = 0

        def names_of(examples: object, rows: object) -> list[str]:
            """The file name of each row of ``examples`` (a TrainImages or CachedExamples), read once."""
            if not hasattr(examples, "recorded_names"):
                examples.recorded_names = list(rows["file_name"])
            return examples.recorded_names

        real_train_get = TrainImages.__getitem__

        def train_get(images: TrainImages, key: tuple[int, int]):
            self.drawn[self.phase].add(names_of(images, images.dataset)[int(key[0])])
            return real_train_get(images, key)

        real_cached_get = CachedExamples.__getitem__

        def cached_get(examples: CachedExamples, key: tuple[int, int]):
            self.drawn[self.phase].add(examples.recorded_names[int(key[0])])
            return real_cached_get(examples, key)

        real_open_or_build = latent_build.open_or_build

        def open_or_build(cfg, rows, comps, acc):
            examples = real_open_or_build(cfg, rows, comps, acc)
            if examples is not None:
                self.cached_runs += 1
                names_of(examples, rows)
            return examples

        def decoding(real):
            def wrapper(image, *args, **kwargs):
                self.decoded[self.phase].add(Path(image.filename).name)
                return real(image, *args, **kwargs)

            return wrapper

        real_loss_images = validation.loss_images

        def loss_images(cfg, tokenizer):
            images = real_loss_images(cfg, tokenizer)
            self.validation_names.append(list(images.names))
            return images

        real_run_validation = validation.run_validation

        def run_validation(t, step):
            self.phase = "validation"
            try:
                return real_run_validation(t, step)
            finally:
                self.phase = "train"

        monkeypatch.setattr(TrainImages, "__getitem__", train_get)
        monkeypatch.setattr(CachedExamples, "__getitem__", cached_get)
        monkeypatch.setattr(latent_build, "open_or_build", open_or_build)
        step_decode = decoding(dataset_module.resize_for_crop)  # a step's images
        monkeypatch.setattr(dataset_module, "resize_for_crop", step_decode)
        monkeypatch.setattr(latent_build, "resize_for_crop", decoding(latent_build.resize_for_crop))  # cache
        monkeypatch.setattr(validation, "loss_images", loss_images)
        monkeypatch.setattr(validation, "run_validation", run_validation)


@pytest.mark.slow
@pytest.mark.parametrize("cache", [False, True], ids=["images", "latent-cache"])
def test_training_never_reads_held_out_images(make_cfg, tmp_path, monkeypatch, cache):
    folder = _copy_sample(tmp_path / "data", tag=tmp_path.name)
    everything = {p.name for p in folder.iterdir() if p.name != "metadata.jsonl"}
    cfg = make_cfg(
        [
            "data=imagefolder",
            f"data.path={folder}",
            f"data.holdout={HOLDOUT}",
            f"data.cache={str(cache).lower()}",
            "data.num_workers=0",  # the recording wrappers live in this process
            "train.max_steps=5",  # 5 steps x 2 = 10 draws: a whole epoch of the 9 training images
            "train.batch_size=2",
            "train.center_crop=true",  # one crop per image: a small cache entry to build
            "train.log_every=1",
            "train.checkpoint_every=100",
            "train.validation_prompts=[]",
        ]
    )
    seen = Recorder(monkeypatch)
    result = train(cfg)
    assert result.step == 5 and not result.interrupted
    during_run = list(seen.validation_names)
    seen.phase = "after"  # the checks below read images too

    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(result.model_dir, subfolder="tokenizer")
    held = validation.loss_images(cfg, tokenizer)
    held_out = set(held.names)
    assert held.held_out and len(held_out) == HOLDOUT and held_out < everything
    assert during_run == [held.names]  # the run's own end-of-training validation read these
    assert seen.drawn["validation"] == held_out  # and the recorder sees reads of held-out images

    trained = everything - held_out
    assert not seen.drawn["train"] & held_out, sorted(seen.drawn["train"] & held_out)
    assert not seen.decoded["train"] & held_out, sorted(seen.decoded["train"] & held_out)
    assert seen.drawn["train"] == trained  # every other image was drawn at least once
    # Without the cache each step decodes the images it draws; with it, building the entry decodes every
    # training image once (the entry is new: the captions carry this test's folder name).
    assert seen.decoded["train"] == trained
    assert seen.cached_runs == int(cache)
