"""prepare's settings, in one place: `alexcli prepare` reads its defaults from here. No numpy, PIL
or torch is imported, so every command's start stays light."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from alexcli.choices import Resample, choice
from alexcli.errors import UsageError

# The largest --size: every worker holds the mean image's running sum (size x size x 3 float64:
# 100 MB at 2048), and 2048 is eight times the paper's 256.
MAX_SIZE = 2048


@dataclass(frozen=True)
class ImageParams:
    """How one source image becomes the JPEG prepare writes (alexcli.data.image.convert)."""

    size: int = 256                 # section 2: 256x256 images
    quality: int = 90               # JPEG quality of the written images
    resample: str = "bicubic"       # resize filter (a Resample value)
    max_pixels: int = 89_478_485    # larger sources are rejected (Pillow's own default limit)


@dataclass(frozen=True)
class PrepareConfig:
    size: int = ImageParams.size
    quality: int = ImageParams.quality
    resample: Resample = Resample(ImageParams.resample)
    max_pixels: int = ImageParams.max_pixels
    seed: int = 0  # order of training samples across shards
    shard_size: int = 1000  # samples per shard (~25 MB at 256x256, quality 90)
    workers: int = 0  # 0: all cores
    strict: bool = False  # any rejected file is a failure
    overwrite: bool = False  # replace a different data set in --out
    holdout: float = 0.0  # fraction of each class of train/ held out as the val split (sources without val/)
    # Statistics over the JPEGs as written (a second decode per image) rather than over the pixels
    # just before encoding: see alexcli.data.stats for why the default is good enough.
    exact_stats: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "resample", choice(Resample, self.resample, "--resample"))

    def validate(self) -> None:
        """Every option check, before anything is read or written."""
        if not 8 <= self.size <= MAX_SIZE:
            raise UsageError(f"--size must be between 8 and {MAX_SIZE}, not {self.size}")
        if not 1 <= self.quality <= 100:
            raise UsageError(f"--quality must be between 1 and 100, not {self.quality}")
        if self.shard_size < 1:
            raise UsageError(f"--shard-size must be at least 1, not {self.shard_size}")
        if self.workers < 0:
            raise UsageError(f"--workers must be 0 (all cores) or more, not {self.workers}")
        if self.max_pixels < 1:
            raise UsageError(f"--max-pixels must be at least 1, not {self.max_pixels}")
        if self.holdout and not 0 < self.holdout < 1:
            raise UsageError(f"--holdout must be between 0 and 1, not {self.holdout}")

    def image_params(self) -> ImageParams:
        return ImageParams(self.size, self.quality, self.resample.value, self.max_pixels)

    def output_parameters(self) -> dict:
        """The parameters that decide the output bytes (not workers, strict or overwrite)."""
        return {k: (v.value if k == "resample" else v) for k, v in asdict(self).items()
                if k not in ("workers", "strict", "overwrite")}
