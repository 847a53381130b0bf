"""The paper's update rule and learning-rate schedules (section 5).

    v <- 0.9 v - 0.0005 * lr * w - lr * grad
    w <- w + v

torch.optim.SGD keeps v <- 0.9 v + grad + wd * w and steps w <- w - lr * v, which is the same
only while lr is constant: after a change it scales the whole remembered velocity by the new
lr. Here lr enters v when the gradient does, as in the paper (and cuda-convnet).
"""

from __future__ import annotations

import math

import torch

from alexcli.choices import ScheduleKind, choice
from alexcli.errors import UsageError
from alexcli.train.config import BASE_LR, LR_DROP, MAX_DROPS, MOMENTUM, WEIGHT_DECAY, default_steps


class PaperSGD(torch.optim.Optimizer):
    """SGD with momentum and weight decay exactly as section 5 writes it (decay on all weights)."""

    def __init__(self, params, lr: float = BASE_LR, momentum: float = MOMENTUM, weight_decay: float = WEIGHT_DECAY):
        if lr <= 0:
            raise UsageError(f"--lr must be positive, not {lr}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
            ws, gs, vs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p)
                ws.append(p), gs.append(p.grad), vs.append(state["velocity"])
            if not ws:
                continue
            torch._foreach_mul_(vs, m)
            torch._foreach_add_(vs, ws, alpha=-wd * lr)
            torch._foreach_add_(vs, gs, alpha=-lr)
            torch._foreach_add_(ws, vs)
        return loss


def param_groups(net: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The optimizer's parameter groups for NET: every parameter decayed (section 5), unless the
    network declares `decayed_parameters() -> (decayed, not decayed)`, as the CIFAR net does
    (cuda-convnet's layer files leave its conv layers undecayed). train and experiment both call this."""
    own = getattr(net, "decayed_parameters", None)
    decayed, plain = own() if own is not None else (list(net.parameters()), [])
    groups = [{"params": list(decayed), "weight_decay": weight_decay}]
    if plain:
        groups.append({"params": list(plain), "weight_decay": 0.0})
    return groups


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class Schedule:
    """The learning rate per epoch.

    `plateau` (the paper's): divide by 10 when the validation error has not improved for
    PATIENCE epochs, at most 3 times. `steps`: divide by 10 after the given epochs (e.g. 30,60,80;
    by default after a third and two thirds of EPOCHS, as torchvision's reference recipe's 30 and
    60 of 90). `constant`: the base rate throughout. `cosine`: half a cosine from the base rate
    towards 0, one value per epoch, over the epochs after the warm-up.
    WARMUP epochs first (any kind) raise the rate linearly: epoch e of W trains at lr * e / (W + 1);
    a plateau does not count them. The rate changes between epochs, never inside one. State is a
    small dict, saved with the trainer state so a resumed run continues exactly."""

    def __init__(self, kind: str = "plateau", base_lr: float = BASE_LR, patience: int = 3,
                 steps: tuple[int, ...] = (), max_drops: int = MAX_DROPS, *, warmup: int = 0, epochs: int = 0):
        kind = choice(ScheduleKind, kind, "--schedule").value
        if kind == "steps" and not steps:
            steps = default_steps(epochs)
            if not steps:
                raise UsageError("--schedule steps needs --lr-steps, e.g. --lr-steps 30,60,80")
        if patience < 1:
            raise UsageError(f"--patience must be at least 1, not {patience}")
        if warmup < 0:
            raise UsageError(f"--warmup must be 0 or more epochs, not {warmup}")
        if epochs and warmup >= epochs:
            raise UsageError(f"--warmup {warmup} leaves no epoch of the {epochs} after it; use fewer")
        self.kind, self.patience, self.steps, self.max_drops = kind, patience, tuple(sorted(steps)), max_drops
        self.base, self.warmup, self.epochs = base_lr, warmup, epochs
        self.drops, self.best, self.bad_epochs = 0, float("inf"), 0
        self.lr = self.lr_at(1)

    def lr_at(self, epoch: int) -> float:
        """The rate epoch EPOCH (1-based) trains at, given the drops so far."""
        if self.kind == "cosine":
            span = max(1, self.epochs - self.warmup)
            t = min(max(epoch - 1 - self.warmup, 0), span)
            rate = self.base * 0.5 * (1 + math.cos(math.pi * t / span))
        elif self.kind == "constant":
            rate = self.base
        else:
            rate = self.base / LR_DROP ** self.drops
        return rate * epoch / (self.warmup + 1) if epoch <= self.warmup else rate

    def end_epoch(self, epoch: int, val_error: float | None) -> bool:
        """Record the error of EPOCH (1-based, just finished) and set the rate of the next; returns
        True if the plateau or steps schedule divided it."""
        dropped = False
        if self.kind == "steps":
            dropped = epoch in self.steps and self._drop()
        elif self.kind == "plateau" and val_error is not None:
            if val_error < self.best:
                self.best, self.bad_epochs = val_error, 0
            elif epoch > self.warmup:
                self.bad_epochs += 1
                if self.bad_epochs >= self.patience and self.drops < self.max_drops:
                    self.bad_epochs = 0
                    dropped = self._drop()
        self.lr = self.lr_at(epoch + 1)
        return dropped

    def _drop(self) -> bool:
        self.drops += 1
        return True

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("kind", "patience", "steps", "max_drops", "lr", "drops", "best",
                                               "bad_epochs", "base", "warmup")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            if k != "min_delta":  # trainer states of earlier versions carry an unused min_delta
                setattr(self, k, tuple(v) if k == "steps" else v)
