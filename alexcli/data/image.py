"""One source image -> one size x size RGB JPEG, as section 2 of the paper prescribes.

The geometry is exact, not rounded: the image is scaled so that its shorter side is `size` and the
central size x size square is kept. We resize only that square (Pillow's `box=`), which is the
same mapping as resize-then-crop without rounding the long side to whole pixels.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile

# Never: ImageFile.LOAD_TRUNCATED_IMAGES = True. A truncated file must be rejected, not padded grey.
assert not ImageFile.LOAD_TRUNCATED_IMAGES

RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


class Reject(Exception):
    """This file cannot be used; str() is the reason recorded in rejected.json."""


@dataclass(frozen=True)
class ImageParams:
    size: int = 256
    quality: int = 90
    resample: str = "bicubic"
    max_pixels: int = 89_478_485  # Pillow's own default limit


def centre_box(w: int, h: int) -> tuple[float, float, float, float]:
    """The central square of side min(w, h), in source pixel coordinates."""
    m = min(w, h)
    left, top = (w - m) / 2, (h - m) / 2
    return (left, top, left + m, top + m)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparent areas are composited on white rather than left as whatever
    colour the hidden pixels happen to hold; 16-bit greys keep their top 8 bits."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Pillow's I -> L conversion clips at 255 instead of scaling; scale a 16-bit range down.
        hi = im.getextrema()[1]
        im = im.point(lambda v: v / 256) if hi > 255 else im
        im = im.convert("L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK (Adobe-inverted handled by the decoder), YCbCr, LAB, F


def open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Open and fully decode `data`, or raise Reject with the reason."""
    if not data:
        raise Reject("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise Reject(f"image too large: {exc}") from None
    except Image.DecompressionBombWarning as exc:
        raise Reject(f"image too large: {exc}") from None
    except Image.UnidentifiedImageError:
        raise Reject("not an image: no image format recognised") from None
    except Exception as exc:
        raise Reject(f"not an image: {type(exc).__name__}: {exc}") from None
    w, h = im.size
    if w * h > max_pixels:
        raise Reject(f"image too large: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    if w < 1 or h < 1:
        raise Reject(f"empty image: {w}x{h}")
    return im


def convert(data: bytes, p: ImageParams) -> tuple[bytes, dict]:
    """Source file bytes -> (JPEG bytes of the size x size image, info about the source)."""
    im = open_checked(data, p.max_pixels)
    w, h = im.size
    info = {"size": [w, h], "mode": im.mode, "format": im.format}
    try:
        if im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK"):
            # libjpeg's DCT scaling decodes straight to 1/2, 1/4 or 1/8 size. Asking for at least
            # twice the target (as Pillow's thumbnail does) keeps the antialiased resize below in
            # charge of quality while skipping most of the decoding of large photos.
            scale = 2 * p.size / min(w, h)
            if scale < 1:
                im.draft(im.mode, (int(w * scale) + 1, int(h * scale) + 1))
        im.load()
        rgb = to_rgb(im)
        sw, sh = rgb.size  # smaller than (w, h) when draft() scaled the decode
        out = rgb.resize((p.size, p.size), RESAMPLE[p.resample], box=centre_box(sw, sh))
    except Reject:
        raise
    except OSError as exc:  # "image file is truncated", "broken data stream", decoder errors
        raise Reject(f"truncated or corrupt: {exc}") from None
    except Exception as exc:
        raise Reject(f"cannot decode: {type(exc).__name__}: {exc}") from None
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=p.quality)
    return buf.getvalue(), info
