"""Telling a run that sits at chance.

A classifier that has learnt nothing predicts every class alike, and its cross-entropy is
ln(classes). Some initialisations keep a network there for thousands of steps (the paper's, at
reduced width; docs/results.md measures them), and a user watching `loss 6.908` cannot tell that
from slow progress. The watch follows the mean training loss over each LOG_EVERY-step window: the
first window below (1 - MARGIN) * ln(classes) is the step the run left chance (recorded in every
metrics row as `left_chance_step`); a run still above it after `--chance-steps` steps is told so
once, and its rows say `at_chance: true` until it leaves.
"""

from __future__ import annotations

import math

MARGIN = 0.05          # "left chance": the window's mean loss is below 0.95 ln(classes)
CHANCE_STEPS = 1000    # default --chance-steps: steps after which a run still at chance is told so


class ChanceWatch:
    def __init__(self, num_classes: int, after: int = CHANCE_STEPS, margin: float = MARGIN):
        self.classes = num_classes
        self.chance = math.log(num_classes)
        self.threshold = (1 - margin) * self.chance
        self.after = after            # 0: never warn (left_chance_step is still recorded)
        self.left_step: int | None = None
        self.warned = False
        self.last_step = 0

    def update(self, step: int, window_loss: float) -> str | None:
        """The mean loss of the window ending at global STEP. Returns 'left' when this window is the
        first below the threshold, 'stuck' the first time the run is past `after` steps at chance."""
        self.last_step = max(self.last_step, step)
        if self.left_step is not None:
            return None
        if window_loss < self.threshold:
            self.left_step = step
            return "left"
        if self.after and step >= self.after and not self.warned:
            self.warned = True
            return "stuck"
        return None

    @property
    def at_chance(self) -> bool:
        return self.left_step is None and bool(self.after) and self.last_step >= self.after

    def message(self, init: str) -> str:
        return (f"the training loss has not fallen below chance (ln {self.classes} = {self.chance:.3f}) "
                f"in {self.last_step:,} steps: this run has not started to learn. Try another --init (it is "
                f"{init}; kaiming leaves chance within the first steps) or a lower --lr")

    def row(self) -> dict:
        """What each metrics.jsonl row records."""
        return {"left_chance_step": self.left_step, "at_chance": self.at_chance}

    def state_dict(self) -> dict:
        return {"left_step": self.left_step, "warned": self.warned, "last_step": self.last_step}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        self.left_step = state.get("left_step")
        self.warned = bool(state.get("warned", False))
        self.last_step = int(state.get("last_step", 0))
