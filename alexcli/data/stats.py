"""Mean image, RGB mean/std and RGB PCA over the training images as written to the shards.

Accumulation is exact. Per image we add the uint8 pixels into a float32 image sum (exact: a chunk
holds far fewer than 2^24 / 255 images) and the 3x3 Gram matrix sum_p x_p x_p^T, computed over
blocks of at most 258 pixels in float32 (each block sum is <= 258 * 255^2 < 2^24, so exact too) and summed
in float64. Across chunks and shards the sums are integers held in float64 / int64 / Python ints,
so the result does not depend on how the work was split across workers or resumed runs.
The covariance is then formed from exact integers, avoiding the cancellation of E[xx] - E[x]^2.

Scale: statistics are saved on a 0..1 pixel scale (as the published ImageNet references are).
Covariance is the population covariance over all pixels of all training images.
"""

from __future__ import annotations

import warnings
from fractions import Fraction

import numpy as np

STATS_FILE = "stats.safetensors"


def exact_block(pixels: int) -> int:
    """The largest divisor of `pixels` whose block sums of 255*255 fit float32's 2^24 exactly."""
    limit = (1 << 24) // (255 * 255)  # 258
    return max(d for d in range(1, limit + 1) if pixels % d == 0)


class ImageSums:
    """Per-worker accumulator over decoded size x size x 3 uint8 images."""

    def __init__(self, size: int):
        import torch  # imported in workers only; the CLI stays light

        # PIL's arrays are read-only; we only read them, so torch's warning about it is noise.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.torch = torch
        self.size = size
        self.image = torch.zeros(size * size * 3, dtype=torch.float32)
        self.gram = torch.zeros(3, 3, dtype=torch.float64)
        self.count = 0
        self._buf = torch.empty(size * size * 3, dtype=torch.float32)
        self._block = exact_block(size * size)

    def add(self, hwc: np.ndarray) -> None:
        t = self.torch
        self._buf.copy_(t.from_numpy(hwc).reshape(-1))
        self.image.add_(self._buf)
        rows = self._buf.view(-1, self._block, 3)  # blocks whose float32 sums stay exact
        self.gram.add_(t.bmm(rows.transpose(1, 2), rows).sum(0, dtype=t.float64))
        self.count += 1

    def take(self) -> dict[str, np.ndarray]:
        """The sums so far (image sum float32, exact; Gram and count int64) as numpy arrays, and reset."""
        out = {
            # float32 is exact for a chunk (< 2^24 / 255 images) and halves what workers send back.
            "image_sum": self.image.numpy().copy().reshape(self.size, self.size, 3),
            "gram": np.rint(self.gram.numpy()).astype(np.int64),
            "count": np.array([self.count], dtype=np.int64),
        }
        self.image.zero_()
        self.gram.zero_()
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


def save(path, stats: dict[str, np.ndarray], count: int) -> None:
    from safetensors.numpy import save_file

    h, w = stats["mean_image"].shape[1:]
    meta = {"scale": "0-1", "image_count": str(count), "pixel_count": str(count * h * w),
            "covariance": "population, over all pixels of all training images"}
    save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in stats.items()}, str(path), metadata=meta)


def load(path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))
