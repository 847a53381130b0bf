"""Top-1 and top-5 error as the paper reports them (section 6), centre crop or ten crops.

`ten` is section 4.1's test: the four corner and the centre patches of each 256x256 image and
their reflections, the softmax averaged over the ten; the ten patches go through the network as
one batch on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alexcli.augment import center_crop, subtract_mean, ten_crops, to_float

CROPS = ("center", "ten")


@dataclass
class Tally:
    """Running counts; `add` takes a batch's probabilities and labels."""

    num_classes: int
    n: int = 0
    top1_wrong: int = 0
    top5_wrong: int = 0
    loss_sum: float = 0.0
    per_class_n: torch.Tensor = field(default=None)
    per_class_wrong: torch.Tensor = field(default=None)

    def __post_init__(self):
        self.per_class_n = torch.zeros(self.num_classes, dtype=torch.long)
        self.per_class_wrong = torch.zeros(self.num_classes, dtype=torch.long)

    def add(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        labels = labels.to(probs.device)
        k = min(5, probs.shape[1])
        top = probs.topk(k, dim=1).indices
        hit1 = top[:, 0] == labels
        hit5 = (top == labels[:, None]).any(dim=1)
        self.n += len(labels)
        self.top1_wrong += int((~hit1).sum())
        self.top5_wrong += int((~hit5).sum())
        self.loss_sum += float(-torch.log(probs.gather(1, labels[:, None]).clamp_min(1e-12)).sum())
        self.per_class_n += torch.bincount(labels.cpu(), minlength=self.num_classes)
        self.per_class_wrong += torch.bincount(labels.cpu()[~hit1.cpu()], minlength=self.num_classes)

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.n, self.top1_wrong, self.top5_wrong, self.loss_sum], dtype=torch.float64)

    def set_from_tensor(self, t: torch.Tensor) -> None:
        self.n, self.top1_wrong, self.top5_wrong, self.loss_sum = int(t[0]), int(t[1]), int(t[2]), float(t[3])

    def result(self) -> dict:
        n = max(1, self.n)
        return {"images": self.n, "top1_error": self.top1_wrong / n, "top5_error": self.top5_wrong / n,
                "loss": self.loss_sum / n}


def prepare_input(images: torch.Tensor, device, mean_image: torch.Tensor | None, crop: int,
                  crops: str = "center") -> torch.Tensor:
    """uint8 (N, 3, S, S) -> the network's float input: (N, 3, crop, crop) or (N*10, 3, crop, crop)."""
    x = to_float(images.to(device, non_blocking=True))
    if mean_image is not None:
        x = subtract_mean(x, mean_image)
    if crops == "ten":
        return ten_crops(x, crop).flatten(0, 1)
    return center_crop(x, crop)


@torch.no_grad()
def predict_probs(model, images: torch.Tensor, device, mean_image, crop: int, crops: str = "center",
                  autocast=None, channels_last: bool = False) -> torch.Tensor:
    """Softmax probabilities per image (averaged over the ten patches with crops='ten')."""
    x = prepare_input(images, device, mean_image, crop, crops)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if autocast is not None:
        with autocast():
            logits = model(x)
    else:
        logits = model(x)
    probs = torch.softmax(logits.float(), dim=1)
    if crops == "ten":
        probs = probs.view(images.shape[0], 10, -1).mean(dim=1)
    return probs
