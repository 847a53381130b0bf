"""The built-in demo data set: small photo-like images drawn procedurally, in ImageNet's layout.

`make_demo(root)` writes root/train/<class>/<class>_NNNN.JPEG and root/val/<class>/..., with
varied sizes and aspect ratios, textured backgrounds, lighting gradients and noise; some images
grayscale, one CMYK, one PNG and one palette GIF named .JPEG, and a few broken files (empty,
truncated, not an image) that `prepare` must list in rejected.json. Everything follows `seed`,
so the same call always writes the same bytes.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from alexcli.io import atomic_write

CLASSES = ("disc", "stripes", "checker", "ring", "triangle", "cross", "dots", "waves")

# The broken files every demo set carries, as (split, class index, name, kind).
BROKEN = (
    ("train", 0, "broken_empty.JPEG", "empty"),
    ("train", 1, "broken_truncated.JPEG", "truncated"),
    ("train", 2, "broken_text.JPEG", "text"),
)


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A smooth random field with a lighting gradient: blurred noise, not flat colour."""
    small = rng.random((max(2, h // 16), max(2, w // 16), 3))
    field = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC),
                       dtype=np.float32)
    base = rng.uniform(40, 200, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    light = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)[..., None] * rng.uniform(20, 60)
    return np.clip(base * 0.6 + field * 0.4 + light, 0, 255)


def _draw(cls: int, rng: np.random.Generator, w: int, h: int) -> Image.Image:
    img = Image.fromarray(_background(rng, w, h).astype(np.uint8))
    d = ImageDraw.Draw(img)
    # Each class has a hue family and a shape; sizes, positions and shades vary per image.
    hue = np.array([[220, 60, 50], [40, 120, 220], [240, 200, 40], [60, 190, 90],
                    [200, 80, 200], [240, 140, 40], [30, 200, 200], [150, 100, 60]][cls], float)
    fg = tuple(int(v) for v in np.clip(hue + rng.normal(0, 25, 3), 0, 255))
    m = min(w, h)
    cx, cy = w / 2 + rng.uniform(-0.15, 0.15) * w, h / 2 + rng.uniform(-0.15, 0.15) * h
    r = m * rng.uniform(0.25, 0.4)
    name = CLASSES[cls]
    if name == "disc":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif name == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=max(2, int(r / 3)))
    elif name == "triangle":
        a = rng.uniform(0, 2 * math.pi)
        d.polygon([(cx + r * math.cos(a + k * 2.094), cy + r * math.sin(a + k * 2.094)) for k in range(3)], fill=fg)
    elif name == "cross":
        t = max(2, int(r / 3))
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fg)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fg)
    elif name == "stripes":
        period = max(4, int(m * rng.uniform(0.08, 0.15)))
        for x0 in range(-h, w + h, period):
            d.line([(x0, 0), (x0 + h * 0.5, h)], fill=fg, width=max(2, period // 2))
    elif name == "checker":
        cell = max(4, int(m * rng.uniform(0.1, 0.2)))
        for y in range(0, h, cell):
            for x in range(0, w, cell):
                if (x // cell + y // cell) % 2 == 0:
                    d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=fg)
    elif name == "dots":
        for _ in range(int(rng.integers(12, 30))):
            x, y, s = rng.uniform(0, w), rng.uniform(0, h), m * rng.uniform(0.03, 0.07)
            d.ellipse([x - s, y - s, x + s, y + s], fill=fg)
    elif name == "waves":
        period = m * rng.uniform(0.15, 0.3)
        for y0 in np.arange(0, h + period, period):
            pts = [(x, y0 + period * 0.25 * math.sin(2 * math.pi * x / period)) for x in range(0, w + 4, 4)]
            d.line(pts, fill=fg, width=max(2, int(period / 5)))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    noisy = np.asarray(img, np.float32) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_demo(root: str | Path, train_per_class: int = 40, val_per_class: int = 10, seed: int = 0,
              min_side: int = 48, max_side: int = 200, broken: bool = True) -> dict:
    """Write the demo set under `root`; returns counts of what was written."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0, "broken": 0, "grayscale": 0}
    special = iter(["cmyk", "png", "gif", "rgba"])  # one of each, early in train
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for cls, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
                img = _draw(cls, rng, w, h)
                kind = next(special, None) if split == "train" and i == 1 else None
                if kind == "cmyk":
                    data = _encode(img.convert("CMYK"), "JPEG", quality=90)
                elif kind == "png":  # a PNG named .JPEG, as n02105855_2933.JPEG in ImageNet
                    data = _encode(img, "PNG")
                elif kind == "gif":
                    data = _encode(img.convert("P", palette=Image.Palette.ADAPTIVE), "GIF")
                elif kind == "rgba":
                    rgba = img.convert("RGBA")
                    rgba.putalpha(Image.new("L", img.size, 200))
                    data = _encode(rgba, "PNG")
                elif rng.random() < 0.1:
                    data = _encode(img.convert("L"), "JPEG", quality=90)
                    counts["grayscale"] += 1
                else:
                    data = _encode(img, "JPEG", quality=int(rng.integers(75, 96)))
                atomic_write(folder / f"{name}_{i:04d}.JPEG", data)
                counts[split] += 1
    if broken:
        good = _encode(_draw(0, rng, 120, 90), "JPEG", quality=90)
        for split, cls, fname, kind in BROKEN:
            data = {"empty": b"", "truncated": good[: len(good) // 2],
                    "text": b"this is not an image\n"}[kind]
            atomic_write(root / split / CLASSES[cls] / fname, data)
            counts["broken"] += 1
    return counts
