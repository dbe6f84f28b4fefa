"""Generation folders made by hand for the merge-side tests (scores, filter, gallery): real files, no model.

Each image is smooth random colour (an 8x8 random image scaled up), so different seeds give clearly
different pictures and perceptual hashes, as photographs do; ``look`` picks the picture, so two images can
share one (a near-duplicate) while keeping their own names and seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sdcluster.generate import records
from sdcluster.generate.images import save_png_atomic


def picture(look: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(look)
    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    return small.resize((size, size), Image.Resampling.BICUBIC)


def record(p: int, i: int, **extra: Any) -> dict[str, Any]:
    base = {"file": records.image_name(p, i), "prompt": f"prompt {p}", "prompt_index": p, "image_index": i}
    return base | {"seed": 1000 * p + i} | extra


def make_folder(out_dir: Path, rows: list[dict[str, Any]], looks: dict[str, int] | None = None) -> Path:
    """Write one image per record (its ``look``: ``looks[file]``, else its seed) and the records in a part."""
    out_dir.mkdir(parents=True, exist_ok=True)
    part = records.part_path(out_dir, 0, 1)
    for row in rows:
        look = (looks or {}).get(row["file"], row["seed"])
        save_png_atomic(picture(look), out_dir / row["file"], row)
        records.append_record(part, row)
    return out_dir
