"""One training run of an experiment ("fit"): a CIFAR net on in-memory data, with the same SGD
step as `alexcli train` (`alexcli.train.step`)."""

from __future__ import annotations

import math
import time

import torch

from alexcli import transforms
from alexcli.data.memory import InMemory
from alexcli.events import Advance, Note, Progress
from alexcli.evaluate import model_probs
from alexcli.experiment.plans import Plan
from alexcli.model.registry import build_model
from alexcli.specs import AugmentContext
from alexcli.train.optim import PaperSGD, param_groups, set_lr
from alexcli.train.step import TrainStep, derive_seed, seed_epoch, train_epoch

SCORE_BATCH = 1000  # images per forward pass when scoring the in-memory test split


class Fit:
    """Train one net on in-memory data; `run()` returns one row per epoch."""

    def __init__(self, plan: Plan, arch, train: InMemory, test: InMemory | None, stats: dict, *, lr: float,
                 epochs: int, seed: int, batch: int, momentum: float, device: torch.device):
        self.plan, self.arch, self.train, self.test = plan, arch, train, test
        self.lr, self.epochs, self.seed, self.batch, self.device = lr, epochs, seed, batch, device
        torch.manual_seed(derive_seed(seed, "init"))
        self.net, self.variants = build_model(arch)
        self.net.to(device)
        self.opt = PaperSGD(param_groups(self.net, plan.weight_decay), lr=lr, momentum=momentum,
                            weight_decay=plan.weight_decay)
        ctx = AugmentContext.from_stats(stats, arch.crop, device)
        self.mean_image = ctx.mean_image
        pipeline, self.augment_used = transforms.build(list(plan.augment), ctx)
        self.step = TrainStep(self.net, self.opt, augment=pipeline, crop=arch.crop)

    def run(self, progress: Progress) -> dict:
        history, seconds, diverged = [], 0.0, False
        n = len(self.train)
        steps = -(-n // self.batch)
        lr = self.lr
        for epoch in range(1, self.epochs + 1):
            if epoch - 1 in self.plan.lr_drops:
                lr /= 10
                set_lr(self.opt, lr)
            t0 = time.perf_counter()
            loss_sum, wrong = self.train_epoch(epoch, steps, progress)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t0
            row = {"epoch": epoch, "train_loss": loss_sum / n, "train_error": wrong / n, "lr": lr,
                   "seconds": seconds}
            if not math.isfinite(row["train_loss"]):
                diverged = True
            elif self.test is not None and self.plan.test:
                row["test_error"] = self.score(self.test)
            history.append(row)
            progress(Note(f"{self.plan.label} lr {self.lr:g} seed {self.seed}  epoch {epoch:>3}  "
                          f"loss {row['train_loss']:.3f}  train err {row['train_error']:.1%}"
                          + (f"  test err {row['test_error']:.1%}" if "test_error" in row else "")
                          + f"  {row['seconds']:.0f} s"))
            if diverged:
                break
        return {"history": history, "diverged": diverged}

    def batches(self, epoch: int, steps: int):
        """The epoch's batches in an order that depends on (seed, epoch) only: every variant of an
        experiment sees the same images in the same order."""
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(
            derive_seed(self.seed, epoch, "order"))).to(self.device)
        for step in range(steps):
            idx = order[step * self.batch:(step + 1) * self.batch]
            yield self.train.images[idx], self.train.labels[idx]

    def train_epoch(self, epoch: int, steps: int, progress: Progress) -> tuple[float, float]:
        """One pass; returns (loss sum, top-1 misses)."""
        shown = [0]

        def logged(done: int, _loss: float, _seen: int) -> None:
            progress(Advance(done - shown[0]))
            shown[0] = done

        gen = seed_epoch(self.seed, epoch)
        loss_sum, wrong, _ = train_epoch(self.step, self.batches(epoch, steps), gen, self.device, steps=steps,
                                         logged=logged)
        return loss_sum, wrong

    @torch.no_grad()
    def score(self, data: InMemory, crops: str = "center") -> float:
        """Top-1 error on DATA: the mean image subtracted, the centre patch or the mean softmax of
        the ten patches (section 4.1)."""
        self.net.eval()
        wrong = 0
        for i in range(0, len(data), SCORE_BATCH):
            probs = model_probs(self.net, transforms.to_float(data.images[i:i + SCORE_BATCH]), self.mean_image,
                                self.arch.crop, crops)
            wrong += int((probs.argmax(1) != data.labels[i:i + SCORE_BATCH]).sum())
        return wrong / len(data)
