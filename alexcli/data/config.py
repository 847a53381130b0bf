"""prepare's settings, in one place: `alexcli prepare` reads its defaults from here. No numpy, PIL
or torch is imported, so every command's start stays light."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from alexcli.choices import Resample, choice


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "resample", choice(Resample, self.resample, "--resample"))

    def image_params(self) -> ImageParams:
        return ImageParams(self.size, self.quality, self.resample.value, self.max_pixels)

    def output_parameters(self) -> dict:
        """The parameters that decide the output bytes (not workers, strict or overwrite)."""
        return {k: (v.value if k == "resample" else v) for k, v in asdict(self).items()
                if k not in ("workers", "strict", "overwrite")}
