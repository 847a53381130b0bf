"""Mean image, RGB mean/std and RGB PCA over the training images prepare writes.

Which pixels: by default those of each resized, cropped image just before it is encoded (one decode
per source image); with `prepare --exact-stats`, those of the JPEG as written, decoded again (what
the network will see, at the cost of a second decode). JPEG at quality 90 moves the RGB mean by
about 1e-4 and the mean image by at most 0.005 (0..1 scale), turns the top eigenvector by under
0.001 rad and shrinks the two small eigenvalues by about 5% (it removes chroma detail): nothing
mean subtraction or the PCA colour noise can tell apart. stats.safetensors and dataset.json
record which ("pixels": "before encoding" or "as written").

Accumulation is exact. Per image we add the pixels (as float32) into an image sum and, for the
3x3 Gram matrix sum_p x_p x_p^T, the six products r*r, g*g, b*b, r*g, g*b, r*b *per pixel
position* into float32 accumulators: three fused multiply-adds over the flat HWC array and its
copies shifted by one and two values (which line up r with g, g with b and r with b). A product is
at most 255^2, so a position's sum over 256 images stays below 2^24 and float32 holds it exactly;
every 256 images (and when the sums are taken) the accumulators are summed over positions into
float64, where the totals are exact integers too. Across chunks and shards the sums are integers
held in float64 / int64 / Python ints, so the result does not depend on how the work was split
across workers or resumed runs. The covariance is then formed from exact integers, avoiding the
cancellation of E[xx] - E[x]^2.

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
FOLD = 256  # images per float32 accumulation: 256 * 255^2 < 2^24, so every partial sum is exact
IMAGE_SUM_EXACT = (1 << 24) // 255  # float32 pixel sums are exact up to this many images


class ImageSums:
    """Per-worker accumulator over size x size x 3 uint8 images (HWC: a numpy array, a PIL image or
    a CPU torch tensor). numpy only: prepare's workers do not import torch for it."""

    def __init__(self, size: int):
        self.size = size
        n = size * size * 3
        self.image = np.zeros(n, np.float32)  # pixel sums, exact below IMAGE_SUM_EXACT images
        self._x = np.empty(n, np.float32)
        self._tmp = np.empty(n, np.float32)
        self._sq = np.zeros(n, np.float32)  # r*r, g*g, b*b at each pixel
        self._next = np.zeros(n, np.float32)  # r*g, g*b (and b * next pixel's r: unused)
        self._next2 = np.zeros(n, np.float32)  # r*b (and two unused products)
        x, t = self._x, self._tmp
        # (accumulator, factor, factor, product buffer) views made once: slicing per image costs more
        # than it seems.
        self._products = [(self._sq, x, x, t), (self._next[:-1], x[:-1], x[1:], t[:-1]),
                          (self._next2[:-2], x[:-2], x[2:], t[:-2])]
        self._gram = np.zeros((3, 3), np.int64)
        self._pending = 0  # images in the float32 product accumulators
        self.count = 0

    def add(self, hwc) -> None:
        a = np.asarray(hwc)
        if a.shape != (self.size, self.size, 3) or a.dtype != np.uint8:
            raise ValueError(f"expected a {self.size}x{self.size}x3 uint8 image, got {a.shape} {a.dtype}")
        if self.count == IMAGE_SUM_EXACT:
            raise ValueError(f"take() the sums at least every {IMAGE_SUM_EXACT} images")
        x = self._x
        np.copyto(x, a.reshape(-1))
        np.add(self.image, x, out=self.image)
        for acc, f, g, t in self._products:
            np.multiply(f, g, out=t)
            np.add(acc, t, out=acc)
        self.count += 1
        self._pending += 1
        if self._pending == FOLD:
            self._fold()

    @staticmethod
    def _lanes(acc: np.ndarray) -> np.ndarray:
        """Sum of a flat HWC accumulator over pixels, per channel lane, in float64 (exact: integers
        below 2^53)."""
        return acc.reshape(-1, 3).sum(0, dtype=np.float64)

    def _fold(self) -> None:
        if self._pending:
            sq, nx, nx2 = (np.rint(self._lanes(a)).astype(np.int64) for a in (self._sq, self._next, self._next2))
            rg, gb, rb = nx[0], nx[1], nx2[0]
            self._gram += np.array([[sq[0], rg, rb], [rg, sq[1], gb], [rb, gb, sq[2]]], np.int64)
            for a in (self._sq, self._next, self._next2):
                a.fill(0)
            self._pending = 0

    def take(self) -> dict[str, np.ndarray]:
        """The sums so far (image sum uint16 or float32, exact; Gram and count int64) as numpy arrays,
        and reset. Workers send these back for every chunk: uint16, exact up to 257 images, sends a
        quarter of what float64 would."""
        self._fold()
        image = self.image.reshape(self.size, self.size, 3)
        out = {
            "image_sum": image.astype(np.uint16) if self.count <= 0xFFFF // 255 else image.copy(),
            "gram": self._gram.copy(),
            "count": np.array([self.count], dtype=np.int64),
        }
        self.image.fill(0)
        self._gram[:] = 0
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
