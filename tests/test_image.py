import io

import numpy as np
import torch
import pytest
from PIL import Image

from alexcli.data.image import ImageParams, Reject, WrittenJpegDecoder, centre_box, convert, decode_rgb, to_rgb


def encode(img, fmt="PNG", **kw):
    b = io.BytesIO()
    img.save(b, format=fmt, **kw)
    return b.getvalue()


def decode(jpg):
    return np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")).astype(int)


def test_centre_box_is_the_central_square():
    assert centre_box(300, 100) == (100.0, 0.0, 200.0, 100.0)
    assert centre_box(100, 301) == (0.0, 100.5, 100.0, 200.5)


@pytest.mark.parametrize("w,h", [(300, 100), (100, 300)])
def test_only_the_central_square_survives(w, h):
    # Red | green | blue thirds along the long side: only green may remain.
    a = np.zeros((h, w, 3), np.uint8)
    third = max(w, h) // 3
    for k, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        if w > h:
            a[:, k * third:(k + 1) * third] = colour
        else:
            a[k * third:(k + 1) * third, :] = colour
    jpg, info = convert(encode(Image.fromarray(a)), ImageParams(size=32, quality=95))
    px = decode(jpg)
    assert px.shape == (32, 32, 3) and info["size"] == [w, h]
    inner = px[2:-2, 2:-2]  # the edge pixels blend in a little of the neighbours, as resizing must
    assert inner[..., 1].min() > 230 and inner[..., 0].max() < 25 and inner[..., 2].max() < 25


def test_geometry_equals_resize_then_crop():
    # 128x64 -> shorter side 32 means a 64x32 resize, then columns 16..48: no rounding involved,
    # so our single box-resize must give exactly the reference pixels.
    rng = np.random.default_rng(0)
    src = Image.fromarray(rng.integers(0, 256, (64, 128, 3), dtype=np.uint8))
    ref = src.resize((64, 32), Image.Resampling.BICUBIC).crop((16, 0, 48, 32))
    jpg, _ = convert(encode(src), ImageParams(size=32, quality=100))
    assert jpg == encode(ref, "JPEG", quality=100)


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "LA", "I;16", "1", "F", "I"])
def test_every_mode_becomes_rgb(mode):
    base = Image.new("RGB", (40, 30), (200, 100, 50))
    img = base.convert(mode) if mode != "I;16" else Image.fromarray(np.full((30, 40), 40000, np.uint16))
    rgb = to_rgb(img)
    assert rgb.mode == "RGB" and rgb.size == (40, 30)
    if mode == "I;16":
        assert rgb.getpixel((0, 0)) == (156, 156, 156)  # 40000 / 256, not clipped to 255
    if mode in ("F", "I"):  # greys already on the 8-bit scale are kept as they are
        grey = base.convert("L").getpixel((0, 0))
        assert rgb.getpixel((0, 0)) == (grey, grey, grey)


@pytest.mark.parametrize("values,expected", [
    (np.array([[0.0, 0.5, 1.0]], np.float32), [0, 128, 255]),  # float in 0..1: x 255
    (np.array([[0.0, 100.0, 255.0]], np.float32), [0, 100, 255]),  # 0..255: kept
    (np.array([[-1.0, 0.0, 3.0]], np.float32), [0, 64, 255]),  # else its own min..max
    (np.array([[0, 40000, 65535]], np.int32), [0, 156, 255]),  # int in 0..65535: top 8 bits
    (np.array([[-2**31, 0, 2**31 - 1]], np.int32), [0, 128, 255]),  # else its own min..max
    (np.full((1, 3), -7, np.int32), [0, 0, 0]),  # constant outside 0..255: black
])
def test_32bit_greys_rule(values, expected):
    assert [to_rgb(Image.fromarray(values)).getpixel((x, 0))[0] for x in range(3)] == expected


def test_transparency_is_composited_on_white():
    img = Image.new("RGBA", (10, 10), (0, 0, 0, 0))  # fully transparent black
    assert to_rgb(img).getpixel((5, 5)) == (255, 255, 255)


def test_png_named_jpeg_and_cmyk_jpeg_convert():
    img = Image.new("RGB", (50, 40), (10, 200, 30))
    for data in (encode(img, "PNG"), encode(img.convert("CMYK"), "JPEG", quality=95)):
        px = decode(convert(data, ImageParams(size=16, quality=95))[0])
        assert np.abs(px - [10, 200, 30]).max() < 12


def test_large_jpeg_uses_draft_and_keeps_the_picture():
    a = np.zeros((1200, 1600, 3), np.uint8)
    a[:, :800] = (250, 20, 20)
    a[:, 800:] = (20, 20, 250)
    jpg, info = convert(encode(Image.fromarray(a), "JPEG", quality=95), ImageParams(size=64))
    px = decode(jpg)
    assert info["size"] == [1600, 1200]
    assert px[:, :28, 0].min() > 200 and px[:, 36:, 2].min() > 200


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file (0 bytes)"),
    (b"hello, not an image", "not an image"),
])
def test_rejects(data, reason):
    with pytest.raises(Reject, match=reason.replace("(", r"\(").replace(")", r"\)")):
        convert(data, ImageParams())


def test_truncated_jpeg_is_rejected_not_padded():
    data = encode(Image.new("RGB", (200, 200), (1, 2, 3)).effect_spread(5), "JPEG", quality=90)
    with pytest.raises(Reject, match="truncated or corrupt"):
        convert(data[: len(data) // 2], ImageParams(size=32))


def test_over_the_pixel_limit_is_rejected():
    with pytest.raises(Reject, match="image too large: 100x100 = 10000 pixels exceeds the limit of 9999"):
        convert(encode(Image.new("RGB", (100, 100))), ImageParams(max_pixels=9999))


@pytest.mark.parametrize("size,quality", [(256, 90), (32, 95), (57, 75)])
def test_written_jpeg_decoder_gives_pils_pixels(size, quality):
    p = ImageParams(size=size, quality=quality)
    dec = WrittenJpegDecoder(p)
    rng = np.random.default_rng(size)
    sources = [Image.fromarray(rng.integers(0, 256, (size + 40, size + 9, 3), dtype=np.uint8)),
               Image.new("L", (size * 2, size), 77),
               Image.linear_gradient("L").resize((size * 3, size * 2)).convert("RGB")]
    for src in sources:
        jpg, _ = convert(encode(src), p)
        ref = decode(jpg)
        for got in (dec(jpg), dec.checked(jpg), torch.from_numpy(decode_rgb(jpg).copy())):
            assert got.shape == (size, size, 3) and got.is_contiguous()
            assert np.array_equal(got.numpy(), ref)


def test_written_jpeg_decoder_uses_libjpeg_turbo_here():
    # torchvision is a dependency, so its decoder should load (without importing torchvision) and
    # agree with PIL; if this fails prepare still works, through PIL, about 0.1 ms slower per image.
    import sys

    had_torchvision = "torchvision" in sys.modules
    assert WrittenJpegDecoder(ImageParams()).fast
    assert ("torchvision" in sys.modules) == had_torchvision


def test_written_jpeg_decoder_falls_back_to_pil_on_any_difference():
    p = ImageParams(size=32)
    dec = WrittenJpegDecoder(p)
    jpg, _ = convert(encode(Image.new("RGB", (40, 40), (1, 2, 3))), p)
    dec._op = lambda data, mode, orient: (torch.from_numpy(decode_rgb(jpg).copy()) + 1).permute(2, 0, 1)  # off by one, else like the op
    assert np.array_equal(dec.checked(jpg).numpy(), decode(jpg)) and not dec.fast
    assert np.array_equal(dec(jpg).numpy(), decode(jpg))
