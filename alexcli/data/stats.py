"""Mean image, RGB mean/std and RGB PCA over the training images prepare writes.

Which pixels: by default those of each resized, cropped image just before it is encoded (one decode
per source image); with `prepare --exact-stats`, those of the JPEG as written, decoded again (what
the network will see, at the cost of a second decode). JPEG at quality 90 moves the RGB mean by
about 1e-4 and the mean image by at most 0.005 (0..1 scale), turns the top eigenvector by under
0.001 rad and shrinks the two small eigenvalues by about 5% (it removes chroma detail): nothing
mean subtraction or the PCA colour noise can tell apart. stats.safetensors and dataset.json
record which ("pixels": "before encoding" or "as written").

Accumulation is exact (ImageSums says how): the pixel sums and the 3x3 Gram matrix
sum_p x_p x_p^T are integers throughout, held in uint16 / int64 / float64 only where those hold
them exactly, and across chunks and shards in int64 / Python ints, so the result does not depend
on how the work was split across workers or resumed runs. The covariance is then formed from exact
integers, avoiding the cancellation of E[xx] - E[x]^2.

Scale: statistics are saved on a 0..1 pixel scale (as the published ImageNet references are).
Covariance is the population covariance over all pixels of all training images.
"""

from __future__ import annotations

import json

from fractions import Fraction

import numpy as np

STATS_FILE = "stats.safetensors"
BEFORE_ENCODING = "before encoding"  # the resized, cropped pixels just before the JPEG encoder (default)
AS_WRITTEN = "as written"  # the written JPEGs decoded again (prepare --exact-stats)


try:  # the one-pass C kernel (setup.py builds it where a C compiler is present)
    from alexcli.data import _pixsums
except ImportError:  # pragma: no cover - depends on the install
    _pixsums = None
KERNELS = ("c", "numpy") if _pixsums is not None else ("numpy",)
KERNEL = KERNELS[0]  # what ImageSums uses by default; `alexcli doctor` shows it
_GRAM6 = ((0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (0, 2))  # the Gram entries ImageSums keeps


class ImageSums:
    """Per-worker accumulator over size x size x 3 uint8 images (HWC: a numpy array, a PIL image or
    a CPU torch tensor). numpy and C only: prepare's workers do not import torch for it.

    Per image: the pixels go into a uint16 image sum (exact for 257 images, then folded into
    int64), and the six distinct entries of the Gram matrix into int64. kernel "c"
    (alexcli/data/_pixsums.c, the default where it was built) does both in one pass over the
    pixels. kernel "numpy" forms each of the three products (x * x, x * next value, x * the value
    after next, over the flat HWC array) once in float32 (exact: at most 255^2) and sums it down
    its columns, 256 rows at a time (exact: 256 * 255^2 < 2^24), then over its lanes in float64. No
    per-pixel accumulator of products is kept: it would be written back to memory for every
    image, which costs more than the arithmetic. Both give the same integers."""

    ROWS = 256  # rows summed at once in float32: 256 * 255^2 < 2^24
    FOLD16 = 0xFFFF // 255  # 257 images of 255 fit a uint16

    def __init__(self, size: int, kernel: str | None = None):
        kernel = kernel or KERNEL
        if kernel not in KERNELS:
            raise ValueError(f"statistics kernel {kernel!r} is not available here (have: {', '.join(KERNELS)})")
        self.size, self.kernel = size, kernel
        n = size * size * 3
        self._image16 = np.zeros(n, np.uint16)  # pixel sums of up to FOLD16 images
        self._image64 = None  # int64, once more than FOLD16 images were added
        self._gram6 = np.zeros(6, np.int64)  # rr, gg, bb, rg, gb, rb (_GRAM6)
        self._pending = 0  # images in the uint16 sum
        self.count = 0
        if kernel == "numpy":
            self._x = np.empty(n, np.float32)
            self._tmp = np.empty(n, np.float32)
            x, t = self._x, self._tmp
            # (factor, factor, product buffer, lane -> index in _gram6) views made once
            self._products = [(x, x, t, (0, 1, 2)), (x[:-1], x[1:], t[:-1], (3, 4)), (x[:-2], x[2:], t[:-2], (5,))]

    def add(self, hwc) -> None:
        if self._pending == self.FOLD16:
            self._fold()
        if not (self.kernel == "c" and self._add_pil(hwc)):
            a = np.asarray(hwc)
            if a.shape != (self.size, self.size, 3) or a.dtype != np.uint8:
                raise ValueError(f"expected a {self.size}x{self.size}x3 uint8 image, got {a.shape} {a.dtype}")
            if self.kernel == "c":
                _pixsums.add(np.ascontiguousarray(a), self._image16, self._gram6)
            else:
                self._add_numpy(a.reshape(-1))
        self._pending += 1
        self.count += 1

    def _add_pil(self, im) -> bool:
        """Add a PIL RGB image of this size through its Arrow export, read where PIL keeps it: no
        copy into an array first (np.asarray's tobytes: half the time of add). False where that
        does not apply: not such an image, a PIL without the export (before Pillow 11.2), or an
        image PIL holds in several memory blocks (only large ones); add then copies it."""
        if getattr(im, "mode", None) != "RGB" or getattr(im, "size", None) != (self.size, self.size):
            return False
        try:
            capsules = im.__arrow_c_array__()
        except (AttributeError, ValueError):
            return False
        _pixsums.add_arrow(*capsules, self._image16, self._gram6)
        return True

    def _add_numpy(self, flat: np.ndarray) -> None:
        np.add(self._image16, flat, out=self._image16)
        np.copyto(self._x, flat)
        t, rows, width = self._tmp, self.size, self.size * 3
        for f, g, out, entries in self._products:
            np.multiply(f, g, out=out)
            t[out.size:] = 0  # the shifted products are shorter: their last values are not products
            grid = t.reshape(rows, width)
            cols = sum((grid[r:r + self.ROWS].sum(0) for r in range(0, rows, self.ROWS)), np.zeros(width))
            lanes = np.rint(cols.reshape(-1, 3).sum(0)).astype(np.int64)  # float64: exact integers
            for lane, k in enumerate(entries):
                self._gram6[k] += lanes[lane]

    def _fold(self) -> None:
        if self._image64 is None:
            self._image64 = np.zeros(self._image16.size, np.int64)
        self._image64 += self._image16
        self._image16.fill(0)
        self._pending = 0

    def take(self) -> dict[str, np.ndarray]:
        """The sums so far (image sum uint16, or int64 past 257 images; Gram and count int64) as
        numpy arrays, and reset. Workers send these back for every chunk: uint16 sends a quarter of
        what float64 would."""
        if self._image64 is None:
            image = self._image16.copy()
        else:
            self._fold()
            image, self._image64 = self._image64, None
        gram = np.zeros((3, 3), np.int64)
        for v, (i, j) in zip(self._gram6, _GRAM6):
            gram[i, j] = gram[j, i] = v
        out = {"image_sum": image.reshape(self.size, self.size, 3), "gram": gram,
               "count": np.array([self.count], dtype=np.int64)}
        self._image16.fill(0)
        self._gram6[:] = 0
        self._pending = 0
        self.count = 0
        return out


def empty_sums(size: int) -> dict[str, np.ndarray]:
    return {"image_sum": np.zeros((size, size, 3), np.float64),
            "gram": np.zeros((3, 3), np.int64), "count": np.zeros(1, np.int64)}


def merge_into(total: dict[str, np.ndarray], part: dict[str, np.ndarray]) -> None:
    total["image_sum"] += part["image_sum"]
    total["gram"] += part["gram"]
    total["count"] += part["count"]


def finalize(image_sum: np.ndarray, gram_sum, count: int) -> dict[str, np.ndarray]:
    """Exact sums (HWC image sum, 3x3 Gram as Python ints or int64, image count) -> statistics."""
    if count == 0:
        raise ValueError("no training images to compute statistics from")
    h, w, _ = image_sum.shape
    pixels = count * h * w
    # Channel sums and the Gram matrix as exact Python integers.
    csum = [int(round(float(v))) for v in image_sum.reshape(-1, 3).sum(0, dtype=np.float64)]
    gram = [[int(gram_sum[i][j]) for j in range(3)] for i in range(3)]
    scale = Fraction(1, 255 * 255)
    cov = np.array([[float((Fraction(gram[i][j], pixels) - Fraction(csum[i] * csum[j], pixels * pixels)) * scale)
                     for j in range(3)] for i in range(3)])
    mean = np.array([csum[i] / pixels / 255 for i in range(3)])
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    # An eigenvector's sign is arbitrary; fix it (largest entry positive) so files are reproducible.
    for k in range(3):
        if eigvec[np.argmax(np.abs(eigvec[:, k])), k] < 0:
            eigvec[:, k] = -eigvec[:, k]
    return {
        "mean_image": np.ascontiguousarray((image_sum / count / 255).transpose(2, 0, 1)),  # 3 x H x W
        "rgb_mean": mean,
        "rgb_std": np.sqrt(np.diag(cov)),
        "rgb_cov": cov,
        "pca_eigval": eigval,
        "pca_eigvec": eigvec,  # columns are the components
    }


def save(path, stats: dict[str, np.ndarray], count: int, pixels: str = BEFORE_ENCODING) -> None:
    from alexcli.io import write_safetensors

    h, w = stats["mean_image"].shape[1:]
    meta = {"scale": "0-1", "image_count": count, "pixel_count": count * h * w, "pixels": pixels,
            "covariance": "population, over all pixels of all training images"}
    # One metadata key: safetensors writes a header's metadata in hash-map order, so several keys
    # would make two identical runs' files differ in their bytes.
    write_safetensors(path, {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in stats.items()},
                      {"alexcli": json.dumps(dict(meta, format="alexcli-stats"), sort_keys=True)})


def load(path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))
