"""Draw the shipped sample dataset: denim jeans laid flat on a white background, with captions.

The seed trained on photos of jeans with hand-written captions; we cannot ship those photos, so this module
draws look-alikes with PIL from a fixed seed. The point is not realism but a dataset with the seed's shape:
file names with spaces, parentheses and upper-case extensions, mixed sizes and formats, and long captions
that describe what is actually in each picture (view, wash and fade, spread or folded legs, marker corner).
Tests and the tiny default run train on it, and ``tests/data/test_sample.py`` checks that regenerating it
reproduces the shipped ``metadata.jsonl``.

    python -m sdcluster.data.sample [DEST]    # default DEST: sdcluster/assets/sample_data
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFilter

from sdcluster.data.metadata import write_metadata
from sdcluster.paths import sample_data_dir

SEED = 1103
NUM_IMAGES = 12
SUPERSAMPLE = 2  # draw at 2x and downsample: antialiased edges without a drawing library
CORNERS = ("upper right", "upper left", "lower right", "lower left")
SIZES = ((192, 192), (160, 224), (224, 160), (256, 192), (176, 208), (128, 128), (192, 256))
WASHES = {"dark indigo": (34, 48, 92), "medium blue": (52, 84, 140), "light wash": (104, 140, 186)}
STITCH = (196, 150, 72)
Point = tuple[float, float]


@dataclass(frozen=True)
class JeansSpec:
    """Everything that varies between pictures; the caption is written from this, never from pixels."""

    file_name: str
    size: tuple[int, int]
    view: str  # "front" or "back"
    wash: str  # a key of WASHES
    fade: float  # 0 = uniform colour, up to ~0.6 = strongly faded thighs or seat
    spread_deg: float  # how far each leg turns out from vertical
    folded: str | None  # side of the image whose leg is folded up, or None
    rotation_deg: float
    marker: str  # one of CORNERS


def make_specs(seed: int = SEED, count: int = NUM_IMAGES) -> list[JeansSpec]:
    """Cycle the discrete choices so every view, wash and corner appears; draw the continuous ones."""
    rng = random.Random(seed)
    washes = list(WASHES)
    specs = []
    for i in range(1, count + 1):
        ext = "png" if i == count else "JPG"
        specs.append(
            JeansSpec(
                file_name=f"11 ({i}).{ext}",
                size=SIZES[(i - 1) % len(SIZES)],
                view=("front", "back")[i % 2],
                wash=washes[(i // 2) % len(washes)],
                fade=rng.choice((0.0, 0.3, 0.55)),
                spread_deg=rng.choice((2.0, 4.0, 9.0, 13.0)),
                folded=("left", "right")[i % 2] if i % 3 == 2 else None,
                rotation_deg=round(rng.uniform(-10.0, 10.0), 1),
                marker=CORNERS[(i - 1 + i // 4) % len(CORNERS)],
            )
        )
    return specs


def caption(spec: JeansSpec) -> str:
    """A long caption in the seed's style, built only from what ``draw`` puts in the picture."""
    side = "back" if spec.view == "back" else "front"
    parts = [
        f"A single pair of {spec.wash} denim jeans laid flat on a white background, viewed from the {side}."
    ]
    if spec.fade >= 0.5:
        where = "seat" if spec.view == "back" else "thighs"
        parts.append(f"The jeans have a strongly faded, worn appearance on the {where}.")
    elif spec.fade > 0:
        parts.append("The jeans have a slightly faded appearance.")
    else:
        parts.append("The denim has an even, unfaded color.")
    if spec.view == "back":
        parts.append("Two stitched back pockets and the yoke seam are clearly visible.")
    else:
        parts.append("The button, the zipper fly and the curved front pockets are visible.")
    legs = "The legs are spread apart" if spec.spread_deg >= 8 else "The legs lie straight and close together"
    if spec.folded:
        legs += f", and the leg on the {spec.folded} side of the image is partially folded up"
    parts.append(legs + ", with natural creases.")
    if abs(spec.rotation_deg) > 4:
        parts.append("The jeans are placed at a slight angle.")
    parts.append(
        f"A small black square reference marker is placed near the {spec.marker} corner of the image."
    )
    return " ".join(parts)


def _lerp(a: Point, b: Point, t: float) -> Point:
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)


@dataclass(frozen=True)
class _Leg:
    """A leg as two straight edges (outer and inner) from the hip to the hem; t=0 is the hip, t=1 the hem."""

    top_outer: Point
    top_inner: Point
    hem_outer: Point
    hem_inner: Point

    def quad(self, t0: float, t1: float) -> list[Point]:
        """The part of the leg between t0 and t1, as a polygon."""
        return [
            _lerp(self.top_outer, self.hem_outer, t0),
            _lerp(self.top_inner, self.hem_inner, t0),
            _lerp(self.top_inner, self.hem_inner, t1),
            _lerp(self.top_outer, self.hem_outer, t1),
        ]


def _legs(cx: float, top: float, length: float, spread_deg: float) -> tuple[_Leg, _Leg]:
    """Left and right leg; each turns out by ``spread_deg`` and narrows from hip to hem."""
    hip_half, rise, hem_width = 0.25 * length, 0.34 * length, 0.17 * length
    a = math.radians(spread_deg)
    legs = []
    for s in (-1, 1):
        top_outer, top_inner = (cx + s * hip_half, top + 0.16 * length), (cx, top + rise)
        mid = _lerp(top_outer, top_inner, 0.5)
        leg_len = length - (mid[1] - top)
        hem_mid = (mid[0] + s * math.sin(a) * leg_len, mid[1] + math.cos(a) * leg_len)
        perp = (s * math.cos(a) * hem_width / 2, -math.sin(a) * hem_width / 2)
        hem_outer = (hem_mid[0] + perp[0], hem_mid[1] + perp[1])
        hem_inner = (hem_mid[0] - perp[0], hem_mid[1] - perp[1])
        legs.append(_Leg(top_outer, top_inner, hem_outer, hem_inner))
    return legs[0], legs[1]


def _shade(rgb: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
    """Towards white for amount > 0, towards black for amount < 0."""
    target = 255 if amount > 0 else 0
    return tuple(round(c + (target - c) * abs(amount)) for c in rgb)  # type: ignore[return-value]


def _body(spec: JeansSpec, w: int, h: int) -> tuple[Image.Image, list[Point], tuple[_Leg, _Leg], float]:
    """The garment's mask (waist, hips, legs) plus the geometry the detail pass needs."""
    length = min(0.74 * h, 0.92 * w)
    cx, top = w / 2, (h - length) / 2
    waist_half = 0.21 * length
    legs = _legs(cx, top, length, spread_deg=spec.spread_deg)
    hips = [
        (cx - waist_half, top),
        (cx + waist_half, top),
        legs[1].top_outer,
        legs[1].top_inner,
        legs[0].top_outer,
    ]
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    draw.polygon(hips, fill=255)
    for leg, side in zip(legs, ("left", "right"), strict=True):
        draw.polygon(leg.quad(0, 0.68 if spec.folded == side else 1), fill=255)
    return mask, hips, legs, length


def _fade_mask(spec: JeansSpec, body: Image.Image, legs: tuple[_Leg, _Leg], length: float) -> Image.Image:
    """Where the wash is lighter: thighs from the front, seat and knees from the back, blurred soft."""
    mask = Image.new("L", body.size, 0)
    draw = ImageDraw.Draw(mask)
    r = 0.08 * length
    spots = (0.05, 0.45) if spec.view == "back" else (0.18, 0.3)
    for leg in legs:
        for t in spots:
            x, y = _lerp(_lerp(leg.top_outer, leg.hem_outer, t), _lerp(leg.top_inner, leg.hem_inner, t), 0.5)
            draw.ellipse((x - r, y - 1.6 * r, x + r, y + 1.6 * r), fill=round(255 * spec.fade / 0.6))
    return ImageChops.multiply(mask.filter(ImageFilter.GaussianBlur(0.07 * length)), body)


def _details(draw: ImageDraw.ImageDraw, spec: JeansSpec, hips: list[Point], legs: tuple[_Leg, _Leg]) -> None:
    """Waistband, loops, seams, pockets and creases: what tells front from back."""
    base = WASHES[spec.wash]
    dark, lw = _shade(base, -0.35), max(1, SUPERSAMPLE)
    (x0, y0), (x1, _) = hips[0], hips[1]
    band = 0.12 * (hips[2][1] - y0)
    draw.rectangle((x0, y0, x1, y0 + band), fill=_shade(base, -0.15), outline=dark, width=lw)
    for fx in (0.08, 0.3, 0.5, 0.7, 0.92):
        x = x0 + (x1 - x0) * fx
        draw.rectangle((x - lw, y0 - lw, x + lw, y0 + 1.4 * band), fill=_shade(base, -0.2))
    cx, crotch = (x0 + x1) / 2, hips[3]
    if spec.view == "front":
        draw.ellipse(
            (cx - 2 * lw, y0 + band / 2 - 2 * lw, cx + 2 * lw, y0 + band / 2 + 2 * lw), fill=(150, 110, 60)
        )
        draw.line(
            [(cx + 3 * lw, y0 + band), (cx + 3 * lw, crotch[1] - 4 * band), crotch], fill=STITCH, width=lw
        )
        r = 0.3 * (x1 - x0)  # front pockets: quarter circles from the waistband down to the side seam
        draw.arc((x0 - r, y0 - r, x0 + r, y0 + r), 0, 90, fill=STITCH, width=lw)
        draw.arc((x1 - r, y0 - r, x1 + r, y0 + r), 90, 180, fill=STITCH, width=lw)
    else:
        yoke = y0 + 2.6 * band
        draw.line([(x0, yoke), (cx, yoke + 1.2 * band), (x1, yoke)], fill=STITCH, width=lw)
        draw.line([(cx, yoke + 1.2 * band), crotch], fill=dark, width=lw)
        pw = 0.36 * (x1 - x0)
        for px in (cx - 0.55 * (x1 - x0) + 0.07 * pw, cx + 0.08 * (x1 - x0)):
            py = yoke + 2.2 * band
            pocket = [
                (px, py),
                (px + pw, py),
                (px + pw, py + pw),
                (px + pw / 2, py + 1.2 * pw),
                (px, py + pw),
            ]
            draw.polygon(pocket, fill=_shade(base, -0.08), outline=STITCH, width=lw)
    for leg, side in zip(legs, ("left", "right"), strict=True):
        end = 0.68 if spec.folded == side else 1.0
        q = leg.quad(0, end)
        draw.line([q[1], q[2]], fill=dark, width=lw)
        for t in (0.35, 0.62, 0.85):
            if t < end - 0.05:
                a, b = leg.quad(t, t)[:2]
                draw.line([_lerp(a, b, 0.2), _lerp(a, b, 0.55)], fill=_shade(base, 0.25), width=lw)
        if spec.folded == side:
            draw.polygon(leg.quad(0.36, 0.68), fill=_shade(base, 0.18), outline=dark, width=lw)
        else:
            draw.line(leg.quad(0.97, 0.97)[:2], fill=dark, width=2 * lw)


def draw(spec: JeansSpec) -> Image.Image:
    """Render one picture: shadow, base wash, fade, details, rotation, downsample, then the marker."""
    w, h = spec.size[0] * SUPERSAMPLE, spec.size[1] * SUPERSAMPLE
    body, hips, legs, length = _body(spec, w, h)
    image = Image.new("RGB", (w, h), (255, 255, 255))
    shadow = ImageChops.offset(body, 3 * SUPERSAMPLE, 4 * SUPERSAMPLE).filter(ImageFilter.GaussianBlur(6))
    image.paste((222, 222, 222), mask=shadow.point(lambda v: v // 2))
    image.paste(WASHES[spec.wash], mask=body)
    if spec.fade:
        image.paste(_shade(WASHES[spec.wash], 0.45), mask=_fade_mask(spec, body, legs, length))
    _details(ImageDraw.Draw(image), spec, hips, legs)
    image = image.rotate(spec.rotation_deg, resample=Image.Resampling.BICUBIC, fillcolor=(255, 255, 255))
    image = image.resize(spec.size, Image.Resampling.LANCZOS)
    side = max(6, round(0.07 * min(spec.size)))
    margin = round(0.05 * min(spec.size))
    left = margin if "left" in spec.marker else spec.size[0] - margin - side
    top = margin if "upper" in spec.marker else spec.size[1] - margin - side
    ImageDraw.Draw(image).rectangle((left, top, left + side - 1, top + side - 1), fill=(0, 0, 0))
    return image


def generate(dest: Path | str, seed: int = SEED, count: int = NUM_IMAGES) -> list[JeansSpec]:
    """Write the images and ``metadata.jsonl`` into ``dest``; files of other names are left alone."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    specs = make_specs(seed, count)
    for spec in specs:
        image = draw(spec)
        if spec.file_name.lower().endswith(".png"):
            image.save(dest / spec.file_name, format="PNG", optimize=True)
        else:
            image.save(dest / spec.file_name, format="JPEG", quality=85, optimize=True)
    write_metadata(dest, [{"file_name": s.file_name, "text": caption(s)} for s in specs])
    return specs


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    dest = Path(args[0]) if args else sample_data_dir()
    specs = generate(dest)
    total = sum((dest / s.file_name).stat().st_size for s in specs)
    print(f"wrote {len(specs)} images ({total / 1024:.0f} KiB) and metadata.jsonl to {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
