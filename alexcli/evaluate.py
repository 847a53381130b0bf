"""Top-1 and top-5 error as the paper reports them (section 6), centre crop or ten crops.

`ten` is section 4.1's test: the four corner and the centre patches of each 256x256 image and
their reflections, the softmax averaged over the ten. On a GPU the ten patches go through the
network as one batch; on the CPU as ten batches of the images' size, one per patch position (see
`model_probs`): the same operations on every patch, and on 2 cores the CIFAR net's ten-patch eval
went from 720 to 1,540 patches/s (benchmarks/eval.py, docs/performance.md).

On the CPU `score` keeps freed memory in the process (`alexcli.env.tune_malloc`, as `alexcli train`
does; it applies to the whole calling process): without it every batch's activations are faulted
in afresh from the OS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alexcli import defaults
from alexcli.choices import Crops, choice
from alexcli.data import stream
from alexcli.events import Advance, Begin, Progress, ignore
from alexcli.transforms import model_input, to_float


@dataclass
class Tally:
    """Running counts; `add` takes a batch's probabilities and labels."""

    num_classes: int
    n: int = 0
    top1_wrong: int = 0
    top5_wrong: int = 0
    loss_sum: float = 0.0
    # confusion[true, predicted]: images of each class by their top-1 prediction (per-class error
    # and the confusion matrix both come from it; 8 MB for 1,000 classes)
    confusion: torch.Tensor = field(default=None)

    def __post_init__(self):
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    @property
    def per_class_n(self) -> torch.Tensor:
        return self.confusion.sum(1)

    @property
    def per_class_wrong(self) -> torch.Tensor:
        return self.per_class_n - self.confusion.diagonal()

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
        pairs = (labels * self.num_classes + top[:, 0]).cpu()  # a cell of the flat matrix per image
        self.confusion.view(-1).index_put_((pairs,), torch.ones_like(pairs), accumulate=True)

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.n, self.top1_wrong, self.top5_wrong, self.loss_sum], dtype=torch.float64)

    def set_from_tensor(self, t: torch.Tensor) -> None:
        self.n, self.top1_wrong, self.top5_wrong, self.loss_sum = int(t[0]), int(t[1]), int(t[2]), float(t[3])

    def result(self) -> dict:
        n = max(1, self.n)
        return {"images": self.n, "top1_error": self.top1_wrong / n, "top5_error": self.top5_wrong / n,
                "loss": self.loss_sum / n}


@torch.no_grad()
def model_probs(model, x: torch.Tensor, mean_image, crop: int, crops: str = "center", autocast=None,
                channels_last: bool = False) -> torch.Tensor:
    """Softmax probabilities per image of float 0..1 images X (averaged over the ten patches)."""
    inp = model_input(x, mean_image, crop, crops)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    if crops == "ten" and inp.device.type == "cpu":
        # One pass per patch position, N patches each (the centre crop's batch), not one of 10 N:
        # a 10 N batch makes every activation ten times larger than the caches and than glibc's
        # largest mmap threshold (32 MB), so each is mapped and faulted in afresh; on 2 cores the
        # CIFAR net's ten-patch eval ran at half its centre-crop patches/s. Every patch goes
        # through the same operations either way, so the logits are the same.
        per = inp.unflatten(0, (x.shape[0], 10)).unbind(1)
        logits = torch.stack([_forward(model, p.contiguous(memory_format=layout), autocast) for p in per], 1)
        logits = logits.flatten(0, 1)
    else:
        logits = _forward(model, inp.contiguous(memory_format=layout), autocast)
    probs = torch.softmax(logits.float(), dim=1)
    if crops == "ten":
        probs = probs.view(x.shape[0], 10, -1).mean(dim=1)
    return probs


def _forward(model, inp: torch.Tensor, autocast=None) -> torch.Tensor:
    if autocast is not None:
        with autocast():
            return model(inp)
    return model(inp)


def predict_probs(model, images: torch.Tensor, device, mean_image, crop: int, crops: str = "center",
                  autocast=None, channels_last: bool = False) -> torch.Tensor:
    """model_probs of uint8 images (N, 3, S, S) as the loader gives them."""
    x = to_float(images.to(device, non_blocking=True))
    return model_probs(model, x, mean_image, crop, crops, autocast, channels_last)


@dataclass
class Scored:
    """A checkpoint ready to score: its network on the device and the input it was trained with."""

    path: str
    model: torch.nn.Module
    mean_image: torch.Tensor | None
    crop: int
    classes: list
    meta: dict


def load_scored(path, device) -> Scored:
    from alexcli.checkpoint import load_model

    model, ckpt = load_model(path, device)
    mean = ckpt.data["mean_image"].float().to(device) if "mean" in ckpt.meta.get("augment", ["mean"]) else None
    return Scored(str(path), model, mean, ckpt.arch.crop, list(ckpt.meta["classes"]), ckpt.meta)


def check_compatible(scored: list[Scored], split) -> None:
    """Every checkpoint must know the data set's classes in the same order, at the same image size."""
    from alexcli.errors import DataError

    first = scored[0]
    for s in scored[1:]:
        if s.classes != first.classes:
            diff = next((i for i, (a, b) in enumerate(zip(s.classes, first.classes)) if a != b), None)
            where = f"first difference at index {diff}" if diff is not None else \
                f"{len(s.classes)} vs {len(first.classes)} classes"
            raise DataError(f"{s.path} and {first.path} list different classes ({where}); "
                            f"an ensemble needs the same class list")
    if split.classes != first.classes:
        raise DataError(f"{split.folder} has {len(split.classes)} classes that differ from the "
                        f"{len(first.classes)} of {first.path}; evaluate on the data set it was trained on")
    for s in scored:
        size = s.meta.get("data", {}).get("size")
        if size is not None and size != split.size:
            raise DataError(f"{s.path} was trained on {size}x{size} images but {split.folder} holds "
                            f"{split.size}x{split.size}")


def score(paths: list, split, *, crops: str = "center", batch: int = defaults.BATCH, workers: int = 0, device="cpu",
          autocast=None, channels_last: bool = False, progress: Progress = ignore) -> dict:
    """Top-1/top-5 error of each checkpoint (a path, or a Scored already loaded) and of their
    averaged softmax (the paper's Table 2).

    Each batch is decoded once and scored by every model in turn; only the running counts are
    kept, so memory grows with the models' weights and nothing else."""
    crops = choice(Crops, crops, "--crops")
    if batch < 1:
        from alexcli.errors import UsageError

        raise UsageError(f"--batch must be at least 1, not {batch}")
    device = torch.device(device)
    if device.type == "cpu":
        from alexcli.env import tune_malloc

        # What `alexcli train` sets on the CPU (tune_cpu), less flushing denormals, which could
        # change a probability: a batch's activations then reuse the memory the last one freed.
        tune_malloc()
    scored = [p if isinstance(p, Scored) else load_scored(p, device) for p in paths]
    check_compatible(scored, split)
    n_classes = len(scored[0].classes)
    tallies = [Tally(n_classes) for _ in scored]
    ensemble = Tally(n_classes)
    progress(Begin(f"{'ensemble' if len(scored) > 1 else 'eval'} {split.name}", split.samples))
    for images, labels in stream.batches(split, batch, train=False, workers=workers, pin=device.type == "cuda"):
        x = to_float(images.to(device, non_blocking=True))
        labels = labels.to(device)
        mean_probs = None
        for s, tally in zip(scored, tallies):
            if channels_last:
                s.model.to(memory_format=torch.channels_last)
            p = model_probs(s.model, x, s.mean_image, s.crop, crops, autocast, channels_last)
            tally.add(p, labels)
            mean_probs = p if mean_probs is None else mean_probs + p
        ensemble.add(mean_probs / len(scored), labels)
        progress(Advance(len(labels)))
    from alexcli.data.dataset import class_names

    return {"split": split.name, "data": str(split.folder), "crops": crops.value, "images": ensemble.n,
            "classes": scored[0].classes, "class_names": class_names(scored[0].meta),
            "models": [dict(path=s.path, epoch=s.meta.get("epoch"), **t.result(), **_by_class(t))
                       for s, t in zip(scored, tallies)],
            "ensemble": dict(ensemble.result(), **_by_class(ensemble)) if len(scored) > 1 else None}


def _by_class(t: Tally) -> dict:
    """A tally's per-class top-1 error and its confusion matrix (rows: true class, columns: predicted)."""
    per_class = [{"class": i, "images": int(n), "top1_error": (int(w) / int(n)) if n else None}
                 for i, (n, w) in enumerate(zip(t.per_class_n.tolist(), t.per_class_wrong.tolist()))]
    return {"per_class": per_class, "confusion": t.confusion.tolist()}


def most_confused(confusion: list[list[int]], k: int = 10) -> list[tuple[int, int, int]]:
    """The K largest off-diagonal entries of CONFUSION as (true class, predicted class, images),
    largest first (ties in class order)."""
    c = torch.tensor(confusion, dtype=torch.long)
    c.fill_diagonal_(0)
    flat = c.flatten()
    order = torch.sort(flat, descending=True, stable=True).indices[:k].tolist()
    n = c.shape[0]
    return [(i // n, i % n, int(flat[i])) for i in order if flat[i] > 0]
