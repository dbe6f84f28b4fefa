"""Per-image scores for the manifest: CLIP image-text similarity and a DCT perceptual hash.

Where scores are computed: in the generation job, right after each batch is rendered, in one batched CLIP
call on the job's device. The pixels are already in memory there (no decode), the CLIP model is loaded once
per shard, and the work is spread over the shards like the rendering; scoring at merge would put every image
of a 100,000-image run through one process after the array has finished. Only what the job could not score
(images whose record was re-added after a crash, or scores turned on for a finished folder) is filled in at
merge by :func:`fill_missing`. Near-duplicates need every hash at once, so they are found at merge
(:func:`near_duplicates`), where comparing 64-bit hashes is cheap.

A record gains ``scores: {"clip": 0.27, "phash": "c3f1..."}`` (each key only when that score is on).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sdcluster import atomic
from sdcluster.config.generate import GenerateConfig, ScoresConfig
from sdcluster.generate.duplicates import KeeperIndex

log = logging.getLogger(__name__)

FILLED = "scores.jsonl"  # in manifest.parts/: scores computed at merge, so a second merge reuses them
_HASH_SIZE, _DCT_SIZE = 8, 32


def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: ``D @ x`` transforms the columns of ``x``."""
    k, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2 / n)
    matrix[0] /= np.sqrt(2)
    return matrix


_DCT = _dct_matrix(_DCT_SIZE)


def phash(image: Image.Image) -> str:
    """The 64-bit DCT perceptual hash (as in ``imagehash.phash``), as 16 hex digits.

    Hand-written rather than a dependency: ``imagehash`` would pull in SciPy and PyWavelets for one 32x32
    DCT, and the hashes are stored in manifests, so their definition must not change with a library's
    release. Grey 32x32 thumbnail, 2-D DCT, the 8x8 lowest frequencies, each bit: above their median.
    Resizing, recompression and small edits move few bits; a different picture moves about half of them.
    """
    grey = image.convert("L").resize((_DCT_SIZE, _DCT_SIZE), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    low = (_DCT @ pixels @ _DCT.T)[:_HASH_SIZE, :_HASH_SIZE]
    bits = (low > np.median(low)).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def hamming(a: str, b: str) -> int:
    """How many of the 64 bits two hex hashes differ in."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


class ClipScorer:
    """A CLIP model and processor loaded once; cosine similarity of each image with its own prompt."""

    def __init__(self, clip_model: str, cache_root: Path | str, device: Any = "cpu") -> None:
        import transformers
        from transformers import CLIPModel, CLIPProcessor

        source = clip_model
        if clip_model == "tiny":
            from sdcluster.models.tiny_clip import ensure_tiny_clip

            source = str(ensure_tiny_clip(cache_root))
        # torchvision is not a dependency: transformers 5 would warn on every load and fall back to its PIL
        # image processor anyway, so ask for that one (older releases have only it and no such argument).
        backend = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {}
        self.processor = CLIPProcessor.from_pretrained(source, **backend)
        # safetensors only, like every model we load: a pickled checkpoint can run code
        self.model = CLIPModel.from_pretrained(source, use_safetensors=True).to(device).eval()
        self.device = device

    def similarity(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        """Cosine similarity (in [-1, 1], not the x100 logit) of image k with prompt k, one batched call."""
        import torch

        inputs = self.processor(
            text=prompts, images=images, return_tensors="pt", padding=True, truncation=True
        ).to(self.device)
        with torch.no_grad():
            out = self.model(**inputs)  # image_embeds and text_embeds come L2-normalised
        cosine = (out.image_embeds * out.text_embeds).sum(dim=-1).clamp(-1, 1)
        return [round(float(c), 6) for c in cosine.cpu()]


class Scorer:
    """What the job calls after each batch: the scores turned on in ``generate.scores``, per image."""

    def __init__(self, cfg: ScoresConfig, cache_root: Path | str, device: Any = "cpu") -> None:
        self.cfg = cfg
        self.clip = ClipScorer(cfg.clip_model, cache_root, device) if cfg.clip else None

    @property
    def active(self) -> bool:
        return self.clip is not None or self.cfg.phash

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[dict[str, Any]]:
        """One ``scores`` dict per image (empty when every score is off)."""
        out: list[dict[str, Any]] = [{} for _ in images]
        if self.clip is not None:
            for entry, value in zip(out, self.clip.similarity(images, prompts), strict=True):
                entry["clip"] = value
        if self.cfg.phash:
            for entry, image in zip(out, images, strict=True):
                entry["phash"] = phash(image)
        return out


def _missing(record: dict[str, Any], cfg: ScoresConfig, can_clip: bool) -> bool:
    scores = record.get("scores", {})
    return (cfg.phash and "phash" not in scores) or (cfg.clip and can_clip and "clip" not in scores)


_HELD = 1024
"""Records held back at most while a batch of unscored ones fills: output keeps the input's order."""


def fill_missing(
    out_dir: Path,
    records: Iterable[dict[str, Any]],
    locate: Callable[[str], Path],
    gen: GenerateConfig | None,
    cache_root: Path | str | None,
    batch_size: int = 32,
) -> Iterator[dict[str, Any]]:
    """Give every record the scores ``gen.scores`` asks for: the job's are kept, the rest computed here.

    A stream in, the same stream out (in order, at most :data:`_HELD` records held back), so the merge of
    a 100,000-image folder never holds its records. Scores computed here are appended to
    ``manifest.parts/scores.jsonl`` and reused by the next merge. CLIP needs a model cache
    (``cache_root``); a merge by hand has none, so it fills perceptual hashes only. ``locate(file)`` says
    where an image lies (it may have been set aside in ``rejected/``).
    """
    filled_path = Path(out_dir) / "manifest.parts" / FILLED
    # only what earlier merges computed: empty when the job scored every image, as it does
    filled = {r["file"]: r["scores"] for r in atomic.read_jsonl(filled_path)}
    cfg = gen.scores if gen is not None else None
    scorer: Scorer | None = None
    held: list[dict[str, Any]] = []
    todo: list[dict[str, Any]] = []
    for record in records:
        if record["file"] in filled:
            record["scores"] = {**filled[record["file"]], **record.get("scores", {})}
        if cfg is not None and _missing(record, cfg, cache_root is not None):
            if scorer is None and cfg.clip and cache_root is not None:
                log.info("scoring the images the generation job did not score")
                scorer = Scorer(cfg, cache_root, "cpu")
            todo.append(record)
        held.append(record)
        if len(todo) == batch_size or (todo and len(held) >= _HELD):
            _score_batch(todo, scorer, cfg, locate, filled_path)
            todo = []
        if not todo:
            yield from held
            held = []
    if todo:
        _score_batch(todo, scorer, cfg, locate, filled_path)
    yield from held


def _score_batch(
    batch: list[dict[str, Any]],
    scorer: Scorer | None,
    cfg: ScoresConfig | None,
    locate: Callable[[str], Path],
    filled_path: Path,
) -> None:
    images = [_load(locate(r["file"])) for r in batch]
    if scorer is not None:
        fresh = scorer.score(images, [r["prompt"] for r in batch])
    else:
        fresh = [{"phash": phash(i)} if cfg is not None and cfg.phash else {} for i in images]
    for record, new in zip(batch, fresh, strict=True):
        record["scores"] = {**new, **record.get("scores", {})}
        atomic.append_jsonl(filled_path, {"file": record["file"], "scores": record["scores"]})


def _load(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def near_duplicates(records: Iterable[dict[str, Any]], distance: int) -> dict[str, tuple[str, int]]:
    """``file -> (keeper, Hamming distance)`` for each image within ``distance`` bits of an earlier keeper.

    ``records`` come in (prompt, image) order and the first of a group of look-alikes is the keeper, so the
    choice is the same on every merge. An image is compared with keepers only, so a chain of small steps
    (A~B, B~C, A far from C) keeps A and C. Records without a hash are neither compared nor keepers.
    Exact, in near-linear time: see :mod:`sdcluster.generate.duplicates`.
    """
    index = KeeperIndex(distance)
    keepers: list[str] = []
    found: dict[str, tuple[str, int]] = {}
    for record in records:
        value = record.get("scores", {}).get("phash")
        if value is None:
            continue
        code = int(value, 16)
        near = index.nearest(code)
        if near is not None:
            found[record["file"]] = (keepers[near[0]], near[1])
            continue
        index.add(code)
        keepers.append(record["file"])
    return found
