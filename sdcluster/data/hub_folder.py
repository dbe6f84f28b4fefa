"""Write a staged hub dataset's split out as an imagefolder (images + ``metadata.jsonl``).

Why a folder and not a ``datasets.Dataset`` handed to the loader: every reader of the data (``data
validate``, the holdout and ``data.max_samples``, ``train.epochs`` counting, the latent cache's image
digests, the model card) reads ``data.path`` through one reader (:mod:`sdcluster.data.reader`); a folder
keeps that one code path, and with it every guarantee tested on folders (exact resume, cache keys). The
image bytes are written as they came (parquet's embedded bytes, or a hard link to the imagefolder's file),
never decoded and re-encoded: the pixels are the dataset's.

The split is read with ``datasets`` (``load_dataset`` of its builder on the staged local files, streamed:
one row in memory at a time, no second Arrow copy), its image column cast to ``Image(decode=False)`` so
each row gives ``{"bytes", "path"}``. File names are the row number, so the folder's name order (which the
loader sorts by) is the dataset's row order.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdcluster import atomic
from sdcluster.config import ConfigError
from sdcluster.data.metadata import METADATA_FILE
from sdcluster.data.reader import IMAGE_EXTENSIONS

if TYPE_CHECKING:
    import datasets

    from sdcluster.data.hub import HubDataSpec

Say = Callable[[str], None]
SOURCE_FILE = "source.json"  # what the folder was made from (repo, commit, split, columns, rows)
REPORT_EVERY = 1000


def _columns_of(features: datasets.Features, kind: type) -> list[str]:
    return [name for name, feature in features.items() if isinstance(feature, kind)]


def check_columns(spec: HubDataSpec, features: datasets.Features) -> None:
    """Refuse, with the fix, an image column that is missing or holds no images, and a caption column that
    is missing or holds no text."""
    import datasets

    images, texts = _columns_of(features, datasets.Image), _columns_of(features, datasets.Value)
    texts = [c for c in texts if features[c].dtype in ("string", "large_string")]
    where = f"{spec.name} (split {spec.split})"
    listed = ", ".join(features) or "none"
    image_fix = (
        f"{spec.key}.image_column={images[0]}"
        if images
        else "pick a dataset with an image column (a datasets Image feature)"
    )
    if spec.image_column not in features:
        raise ConfigError(
            f"{spec.key}.image_column: {spec.image_column!r} is not a column of {where}; its columns: "
            f"{listed}. Fix: {image_fix}"
        )
    if spec.image_column not in images:
        raise ConfigError(
            f"{spec.key}.image_column: the column {spec.image_column!r} of {where} holds "
            f"{features[spec.image_column]!r}, not images. Fix: {image_fix}"
        )
    text_fix = f"{spec.key}.caption_column=" + (texts[0] if texts else "<a text column>")
    if spec.caption_column not in features:
        raise ConfigError(
            f"{spec.key}.caption_column: {spec.caption_column!r} is not a column of {where}; its columns: "
            f"{listed}. Fix: {text_fix}"
        )
    if spec.caption_column not in texts:
        raise ConfigError(
            f"{spec.key}.caption_column: the column {spec.caption_column!r} of {where} holds "
            f"{features[spec.caption_column]!r}, not text. Fix: {text_fix}"
        )


def load_split(spec: HubDataSpec, builder: str, files: list[Path]) -> datasets.IterableDataset:
    """The split as ``datasets`` loads it from the staged files, checked, images left encoded."""
    import datasets

    split = datasets.load_dataset(
        builder, data_files={spec.split: [str(f) for f in files]}, split=spec.split, streaming=True
    )
    features = split.features or split._resolve_features().features
    check_columns(spec, features)
    return split.cast_column(spec.image_column, datasets.Image(decode=False))


def _suffix(image: dict[str, Any]) -> str:
    """The file suffix of an encoded image: its path's, else the format Pillow reads in its bytes."""
    from PIL import Image

    suffix = Path(image.get("path") or "").suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return suffix
    data = image.get("bytes")
    if data is None:
        return suffix
    with contextlib.suppress(Exception):  # not an image: validate names the file and what is wrong
        fmt = Image.open(io.BytesIO(data)).format
        named = [ext for ext, f in Image.registered_extensions().items() if f == fmt]
        return next((ext for ext in (".jpg", ".png", ".webp") if ext in named), named[0] if named else "")
    return ".bin"


def _write_image(image: dict[str, Any], dest: Path) -> None:
    if image.get("bytes") is not None:
        dest.write_bytes(image["bytes"])
        return
    source = Path(os.path.realpath(image["path"]))  # the snapshot's symlink: link the blob itself
    try:
        os.link(source, dest)  # no second copy of the bytes where the cache and the folder share a disk
    except OSError:
        shutil.copyfile(source, dest)


def write_imagefolder(
    spec: HubDataSpec, builder: str, files: list[Path], folder: Path, say: Say | None
) -> int:
    """Write the split as an imagefolder at ``folder`` (published in one rename: a folder that exists is
    complete, and a second launch reuses it); returns the number of images."""
    split = load_split(spec, builder, files)
    tmp = atomic.staging_dir(folder)
    entries = []
    try:
        for row_number, row in enumerate(split):
            image = row[spec.image_column]
            if image is None or (image.get("bytes") is None and not image.get("path")):
                continue  # a row without an image trains nothing; the count below says how many were kept
            name = f"{row_number:08d}{_suffix(image)}"
            _write_image(image, tmp / name)
            entries.append({"file_name": name, spec.caption_column: row[spec.caption_column] or ""})
            if say and len(entries) % REPORT_EVERY == 0:
                say(f"{spec.key}: {len(entries)} images of {spec.name} written to {folder}")
        if not entries:
            raise ConfigError(
                f"{spec.key}.split: the split {spec.split!r} of {spec.name} has no images. Fix: pick another "
                f"{spec.key}.split or {spec.key}.image_column"
            )
        (tmp / METADATA_FILE).write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
        source = {"name": spec.name, "split": spec.split, "images": len(entries)}
        source |= {"image_column": spec.image_column, "caption_column": spec.caption_column}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic.publish_dir(tmp, folder, replace=False)
    return len(entries)
