"""One source image -> one size x size RGB JPEG, as section 2 of the paper prescribes.

The geometry is exact, not rounded: the image is scaled so that its shorter side is `size` and the
central size x size square is kept. We resize only that square (Pillow's `box=`), which is the
same mapping as resize-then-crop without rounding the long side to whole pixels.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageFile

from alexcli.data.config import ImageParams
from alexcli.data.scan import file_kind

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


# The largest file read_source reads. ImageNet's largest training JPEG is about 15 MB, and even an
# uncompressed 8-bit RGBA TIFF at the default max_pixels (89.5 M) is 358 MB, so no image prepare
# could use is refused; what the limit stops is a worker reading a runaway file into memory (a disk
# image named .jpg, a file growing while read): one worker per core holds at most this much at a time.
MAX_SOURCE_BYTES = 512 * 2**20


def open_regular(path) -> tuple[int, os.stat_result]:
    """A read-only descriptor of PATH and its stat, or Reject with the reason ("unreadable: ...",
    "not a regular file (FIFO)"). The opened file itself is checked, as the tree may change after a
    scan stat-ed it (O_NONBLOCK: opening a FIFO does not wait for a writer). Every source file and
    archive alexcli reads is opened here."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise Reject(f"unreadable: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise Reject(f"not a regular file ({file_kind(st.st_mode)})")
    return fd, st


def read_source(path: Path, max_bytes: int = MAX_SOURCE_BYTES) -> bytes:
    """The bytes of one source file, or Reject. Only a regular file is read (`open_regular`), and
    at most max_bytes of it."""
    fd, st = open_regular(path)
    try:
        if st.st_size > max_bytes:
            raise Reject(f"file too large: {st.st_size} bytes exceeds the limit of {max_bytes}")
        chunks, n = [], 0
        while n <= max_bytes:  # a file that grew since fstat stops at max_bytes + 1
            # ask for what fstat said (+1 to see the end): os.read allocates what it is asked for,
            # and a 16 MiB buffer per 110 KB photo cost more than the read itself
            want = st.st_size + 1 - n if n <= st.st_size else 1 << 24
            chunk = os.read(fd, min(max_bytes + 1 - n, want))
            if not chunk:
                break
            chunks.append(chunk)
            n += len(chunk)
        if n > max_bytes:
            raise Reject(f"file too large: more than {max_bytes} bytes (it grew while being read)")
        return b"".join(chunks)
    except OSError as exc:
        raise Reject(f"unreadable: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def centre_box(w: int, h: int) -> tuple[float, float, float, float]:
    """The central square of side min(w, h), in source pixel coordinates."""
    m = min(w, h)
    left, top = (w - m) / 2, (h - m) / 2
    return (left, top, left + m, top + m)


def _grey_to_l(im: Image.Image) -> Image.Image:
    """A 32-bit grey (mode F or I) -> L, scaled rather than clipped (Pillow's convert("L") clips, so
    a 0..1 float image came out black): see to_rgb for the rule. float32 arithmetic: a full-size
    image's temporaries stay at 4 bytes a pixel, and 8-bit output does not need more."""
    import numpy as np

    a = np.asarray(im)  # float32 for F, int32 for I
    if im.mode == "F" and not np.isfinite(a).all():
        raise Reject("float image with NaN or infinite pixel values")
    lo, hi = float(a.min()), float(a.max())
    if im.mode == "F" and lo >= 0 and hi <= 1:
        out = np.rint(a * np.float32(255))
    elif lo >= 0 and hi <= 255:
        out = np.rint(a) if im.mode == "F" else a
    elif im.mode == "I" and lo >= 0 and hi <= 65535:
        out = a >> 8  # the top 8 bits, as for I;16
    elif hi > lo:
        scale = 255 / (hi - lo)  # a * scale - lo * scale: no float32 overflow near +-3.4e38
        out = np.rint(a.astype(np.float32) * np.float32(scale) - np.float32(lo * scale))
    else:
        out = np.zeros(a.shape, np.uint8)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "L")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparent areas are composited on white rather than left as whatever
    colour the hidden pixels happen to hold; 16-bit greys keep their top 8 bits.

    32-bit greys (TIFF's mode F, float, and mode I, int) take the smallest usual range that holds
    all their values: a float image in 0..1 is scaled by 255; values in 0..255 are kept; an int image
    in 0..65535 keeps its top 8 bits, like a 16-bit one; anything else (negative values, a float
    image beyond 255) maps its own min..max linearly to 0..255 (a constant image to black). A
    float image with NaN or infinite values is rejected: there is no right grey for them."""
    if im.mode == "RGB":
        return im
    if im.mode in ("F", "I"):
        im = _grey_to_l(im)
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        # Pillow's I -> L conversion clips at 255 instead of scaling; scale a 16-bit range down.
        hi = im.getextrema()[1]
        im = im.point(lambda v: v / 256) if hi > 255 else im
        im = im.convert("L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK (Adobe-inverted handled by the decoder), YCbCr, LAB


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
    return _check_size(im, max_pixels)


def _check_size(im: Image.Image, max_pixels: int) -> Image.Image:
    """IM, or Reject when it has more than MAX_PIXELS pixels or none."""
    w, h = im.size
    if w * h > max_pixels:
        raise Reject(f"image too large: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    if w < 1 or h < 1:
        raise Reject(f"empty image: {w}x{h}")
    return im


class Converted(NamedTuple):
    jpg: bytes            # what prepare writes
    info: dict            # about the source: size [w, h], mode, format; copied, upscaled when so
    image: Image.Image    # the size x size RGB pixels jpg encodes (jpg's own pixels when copied)


def convert(data: bytes | Image.Image, p: ImageParams) -> tuple[bytes, dict]:
    """Source file bytes (or an image already decoded) -> (JPEG bytes of the size x size image,
    info about the source)."""
    done = convert_pixels(data, p)
    return done.jpg, done.info


def convert_pixels(data: bytes | Image.Image, p: ImageParams) -> Converted:
    """convert(), also giving the pixels before encoding (prepare's statistics are over them)."""
    im = _check_size(data, p.max_pixels) if isinstance(data, Image.Image) else open_checked(data, p.max_pixels)
    w, h = im.size
    info = {"size": [w, h], "mode": im.mode, "format": im.format}
    if min(w, h) < p.size:
        info["upscaled"] = True
    try:
        if im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK"):
            # libjpeg's DCT scaling decodes straight to 1/2, 1/4 or 1/8 size. Asking for at least
            # twice the target (as Pillow's thumbnail does) keeps the antialiased resize below in
            # charge of quality while skipping most of the decoding of large photos.
            scale = 2 * p.size / min(w, h)
            if scale < 1:
                im.draft(im.mode, (int(w * scale) + 1, int(h * scale) + 1))
        im.load()
        if (isinstance(data, bytes) and im.format == "JPEG" and im.mode == "RGB" and (w, h) == (p.size, p.size)
                and not im.info.get("progressive")):
            # already what prepare would write (CIFAR's 32x32 JPEGs at --size 32): keep the
            # source's bytes rather than add a second lossy encoding
            return Converted(data, dict(info, copied=True), im)
        rgb = to_rgb(im)
        sw, sh = rgb.size  # smaller than (w, h) when draft() scaled the decode
        out = rgb.resize((p.size, p.size), RESAMPLE[p.resample], box=centre_box(sw, sh))
    except Reject:
        raise
    except OSError as exc:  # "image file is truncated", "broken data stream", decoder errors
        raise Reject(f"truncated or corrupt: {exc}") from None
    except Exception as exc:
        raise Reject(f"cannot decode: {type(exc).__name__}: {exc}") from None
    return Converted(encode(out, p), info, out)


def encode(im: Image.Image, p: ImageParams) -> bytes:
    """The JPEG that prepare writes for an RGB image (baseline, 4:2:0, quality `p.quality`)."""
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=p.quality)
    return buf.getvalue()


# ---------------------------------------------------------------- reading back what was written

def decode_rgb(jpg: bytes):
    """Image bytes -> HxWx3 uint8 numpy array (read-only), decoded by PIL: the one decoder of what
    prepare wrote. The loader, eval, the figures and the statistics' reference all call it, so the network
    sees exactly the pixels the mean image and PCA were computed on."""
    import numpy as np

    with Image.open(io.BytesIO(jpg)) as im:
        return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))


def _libjpeg_turbo_op():
    """torchvision's CPU `decode_jpeg` op (libjpeg-turbo), loaded from its extension library
    without importing torchvision, whose import costs about a second (it pulls in torch._dynamo)
    in every worker; None where that library is not found or does not load."""
    import importlib.util
    from pathlib import Path

    import torch

    try:
        return torch.ops.image.decode_jpeg  # torchvision already imported
    except (AttributeError, RuntimeError):
        pass
    try:
        spec = importlib.util.find_spec("torchvision")
        folder = Path(spec.submodule_search_locations[0])
        libs = [f for f in folder.iterdir() if f.name.split(".")[0] in ("image", "image_stable")
                and f.suffix in (".so", ".pyd", ".dylib")]
        if len(libs) != 1:
            return None
        torch.ops.load_library(str(libs[0]))
        return torch.ops.image.decode_jpeg
    except Exception:
        return None


def _probe_image(size: int) -> Image.Image:
    """A size x size test picture that exercises a JPEG decoder's IDCT, chroma upsampling and
    colour clamping: noise, smooth ramps, saturated blocks and hard edges."""
    import numpy as np

    rng = np.random.default_rng(2012)
    a = rng.integers(0, 256, (size, size, 3)).astype(np.float64)
    ramp = np.linspace(0, 255, size)
    a[: size // 2, :, 0] = ramp
    a[:, : size // 2, 1] = ramp[:, None]
    q = max(1, size // 4)
    for k, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
        a[k * q:(k + 1) * q, -q:] = colour
    return Image.fromarray(a.astype(np.uint8))


class WrittenJpegDecoder:
    """Decodes the JPEGs prepare writes to exactly the pixels PIL gives them (the statistics are over
    the images as written: what the network will see), faster than PIL: on the benchmark machine
    0.24 ms per 256x256 image against 0.29 ms for PIL into an array (0.38 ms the way prepare did it
    before, through .convert("RGB") and np.asarray).

    The fast path is libjpeg-turbo through torchvision's decode_jpeg op, on the bytes in memory,
    straight into an HWC tensor (no PIL image, no extra copy). PIL decodes with libjpeg-turbo too
    (pillow-simd links the system's; Pillow's wheels bundle it), with the same defaults (accurate
    integer IDCT, fancy upsampling), so both give the same pixels. That is checked rather than
    assumed: on a probe image at set-up and on every CHECK_EVERY-th image after that (the first
    included). Any difference turns the fast path off for good, and the image in hand is the one
    PIL decoded."""

    CHECK_EVERY = 256

    def __init__(self, p: ImageParams):
        self._op = _libjpeg_turbo_op()
        self._calls = 0
        if self._op is not None:
            try:
                self.checked(encode(_probe_image(p.size), p))
            except Exception:
                self._op = None

    @property
    def fast(self) -> bool:
        return self._op is not None

    def _fast(self, jpg: bytes):
        import torch

        # mode 3 is ImageReadMode.RGB; the op returns a CHW view of an HWC buffer.
        return self._op(torch.frombuffer(bytearray(jpg), dtype=torch.uint8), 3, False).permute(1, 2, 0)

    def __call__(self, jpg: bytes):
        """JPEG bytes -> HxWx3 uint8 torch tensor (contiguous)."""
        self._calls += 1
        if self._op is None or self._calls % self.CHECK_EVERY == 1:
            return self.checked(jpg)
        return self._fast(jpg)

    def checked(self, jpg: bytes):
        """PIL's pixels, compared with the fast path's while it is on."""
        import torch

        ref = torch.from_numpy(decode_rgb(jpg).copy())  # decode_rgb's array is read-only
        if self._op is not None:
            got = self._fast(jpg)
            if got.shape != ref.shape or not got.is_contiguous() or not torch.equal(got, ref):
                self._op = None
        return ref
