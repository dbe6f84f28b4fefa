"""Which image files a dataset may hold, judged the same way by ``validate`` and by the job that loads them.

A file is read only if its real path (symlinks resolved) lies inside the dataset folder and its first bytes
say JPEG, PNG or WebP, whatever its name: Pillow decodes dozens of other formats (TIFF, FITS...), each a
parser that a file copied from elsewhere could attack. Then it must decode completely within the pixel limit.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageFile


@contextlib.contextmanager
def _strict_decoding() -> Iterator[None]:
    """Decode truncated files as errors even if some library switched Pillow to tolerate them."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")  # Pillow decodes dozens more (TIFF, FITS...): not ours to parse


def sniff_format(path: Path) -> str | None:
    """The format the first bytes say (JPEG, PNG or WEBP), whatever the name; None for anything else."""
    with open(path, "rb") as fh:
        head = fh.read(12)
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def plainly_inside(path: Path, folder: Path) -> bool:
    """True for a file directly in ``folder`` that is not a symlink: its real path is the folder's real path
    and its name, inside by construction. One ``lstat``, where a realpath costs one per component of the path
    (at 100,000 images that walk was most of a job's start)."""
    text = os.fspath(path)
    return os.path.dirname(text) == os.fspath(folder) and not os.path.islink(text)


def file_problem(path: Path, folder: Path, root: Path | None = None) -> tuple[str, str] | None:
    """``(kind, message)`` if the file may not be read at all: it resolves outside the dataset folder (a
    symlink to /etc/passwd, a mount elsewhere) or is not a JPEG, PNG or WebP by content. Checked by
    ``validate`` and again when a job loads the folder, so what validate passes the job reads. ``root``:
    ``folder.resolve()``, when the caller checks many files of one folder."""
    try:
        if plainly_inside(path, folder):
            kind = sniff_format(path)
        else:
            real, root = path.resolve(), folder.resolve() if root is None else root
            if not real.is_relative_to(root):
                return (
                    "outside_folder",
                    f"resolves to {real}, outside the dataset folder; copy the image into it",
                )
            kind = sniff_format(real)
    except (OSError, RuntimeError) as err:  # a symlink loop (RuntimeError before Python 3.13), EACCES, EIO
        return "unreadable", f"cannot be read ({err}); fix the file or its permissions, or delete the line"
    if kind is None:
        kinds = ", ".join(ALLOWED_FORMATS)
        return "unreadable", (
            f"is not a {kinds} file by its content, whatever its name (a corrupt file, or another format "
            "such as TIFF); re-export the image as PNG or delete it"
        )
    return None


def check_image(path: Path, max_pixels: int, folder: Path | None = None) -> tuple[str, str] | None:
    """``(kind, message)`` if the image may not be read, is too large or does not fully decode, else None."""
    bad = file_problem(path, folder if folder is not None else path.parent)
    if bad:
        return bad
    try:
        with _strict_decoding(), Image.open(path, formats=ALLOWED_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                return "too_large", (
                    f"{width}x{height} = {width * height} pixels is over the limit of {max_pixels}; "
                    "downscale the image or raise data.max_pixels"
                )
            image.load()
    except Image.DecompressionBombError:
        return "too_large", f"over Pillow's decompression-bomb limit (and {max_pixels}); downscale the image"
    except Exception as err:  # Pillow raises many types for corrupt files; all mean "replace this file"
        return "unreadable", f"cannot be decoded ({err}); re-export the image or delete it"
    return None
