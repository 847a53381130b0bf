"""One SGD step and one epoch of them: the code `alexcli train`, `alexcli experiment` and the
benchmarks all run.

A step takes a batch of uint8 images already on the training device, makes the network's input
(0..1 floats, the `--augment` pipeline, the centre patch when no augmentation crops, the memory
layout asked for), runs the network under autocast when asked, and takes the paper's SGD step on
the cross-entropy loss.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Callable, Iterable, NamedTuple

import torch
import torch.nn.functional as F

from alexcli.data.stream import images_on
from alexcli.transforms import center_crop, to_float

LOG_EVERY = 10  # steps between loss checks / progress updates (each one syncs the device)


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts, the same in every process and on every platform."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def seed_epoch(*parts) -> torch.Generator:
    """Every random stream of one epoch from PARTS (train: seed, epoch, rank; experiment: seed,
    epoch): torch's global generator (dropout) is re-seeded and the augmentations' CPU generator
    returned. Re-seeding at each epoch start is what makes a resumed run exact."""
    torch.manual_seed(derive_seed(*parts, "torch"))
    return torch.Generator().manual_seed(derive_seed(*parts, "augment"))


class TrainStep:
    """`step(images, labels, gen) -> (loss, logits)`, both detached, on the model's device."""

    def __init__(self, model, opt: torch.optim.Optimizer, *, augment=None, crop: int | None = None,
                 channels_last: bool = False, autocast: Callable | None = None):
        self.model, self.opt, self.augment, self.crop = model, opt, augment, crop
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.autocast = autocast

    def inputs(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """uint8 images (N, 3, S, S) on the device -> the network's training input."""
        x = to_float(images)
        if self.augment is not None:
            x = self.augment(x, gen)
        if self.crop is not None and x.shape[-1] != self.crop:  # no 'crop' in --augment: the centre patch
            x = center_crop(x, self.crop)
        # the loader's batches have channels-last strides; give the model the layout it was asked for
        return x.contiguous(memory_format=self.memory_format)

    def update(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, loss, backward and the optimizer's step on a ready input X."""
        with self.autocast() if self.autocast else contextlib.nullcontext():
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach(), logits.detach()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator):
        return self.update(self.inputs(images, gen), labels)


class Tally(NamedTuple):
    """An epoch's running sums on one rank: steps done, loss sum and top-1 misses (device tensors),
    images seen. What a mid-epoch snapshot saves so a resumed epoch ends with the same metrics."""

    done: int
    loss_sum: torch.Tensor
    wrong: torch.Tensor
    seen: int


def train_epoch(step: TrainStep, batches: Iterable, gen: torch.Generator, device: torch.device, *,
                steps: int, logged: Callable[[int, float, int], None], log_every: int = LOG_EVERY,
                start: tuple[int, float, float, int] | None = None,
                after_step: Callable[[Tally], None] | None = None) -> tuple[float, float, int]:
    """One epoch of STEP over BATCHES ((images, labels): decoded or packed, on any device); returns
    this rank's (loss sum, top-1 misses, images). LOGGED(steps done, mean loss so far, images so
    far) is called every LOG_EVERY steps and after the last: each call syncs the device once, and
    is where a caller stops a diverging run or moves a progress bar. START (steps done, loss sum,
    misses, images) continues an epoch resumed mid-way (BATCHES then begins after those steps);
    AFTER_STEP(tally) runs after every step but the last: where train saves a snapshot or stops."""
    step.model.train()
    done, loss0, wrong0, seen = start or (0, 0.0, 0.0, 0)
    loss_sum = torch.full((), loss0, device=device, dtype=torch.float64)
    wrong = torch.full((), int(wrong0), device=device, dtype=torch.long)
    for images, labels in batches:
        labels = labels.to(device, non_blocking=True)
        loss, logits = step(images_on(images, device), labels, gen)
        loss_sum += loss.double() * len(labels)
        wrong += (logits.argmax(1) != labels).sum()
        seen += len(labels)
        done += 1
        if done % log_every == 0 or done == steps:
            logged(done, float(loss_sum) / seen, seen)
        if after_step is not None and done < steps:
            after_step(Tally(done, loss_sum, wrong, seen))
    return float(loss_sum), float(wrong), seen
