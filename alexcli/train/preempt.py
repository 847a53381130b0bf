"""Stopping a run and continuing it mid-epoch: snapshots, and SIGTERM / SIGINT.

An ImageNet epoch on the paper's hardware takes hours and clusters stop jobs with SIGTERM and a grace
period, so a run also saves inside an epoch. At step S of epoch E (every --save-every steps, and when
a stop signal arrives) rank 0 writes

  ckpt-eEEE-sSSSSSS.safetensors   the weights, as an ordinary checkpoint (eval and predict read it)
  state-eEEE-sSSSSSS.safetensors  the momentum buffers and every rank's random-number states
  state-eEEE-sSSSSSS.json         every rank's running sums of the epoch, the schedule, the best
                                  epoch, the metric rows; written last, so it marks the snapshot
                                  complete

and then removes the older snapshots; the epoch's commit removes the epoch's. `--resume` restores
weights, momentum and random states, skips the S batches already trained on (the data order is a
function of seed, epoch and rank: `alexcli.data.stream`), and ends bit-identical to a run that was
never stopped.
"""

from __future__ import annotations

import json
import re
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from alexcli import checkpoint as ck
from alexcli.errors import DataError
from alexcli.io import write_json, write_safetensors

if TYPE_CHECKING:
    import torch

SNAPSHOT_RE = re.compile(r"^state-e(\d{3,})-s(\d{6,})\.json$")
SNAPSHOT_CKPT_RE = re.compile(r"^ckpt-e(\d{3,})-s(\d{6,})\.safetensors$")
SNAPSHOT_TENSORS_RE = re.compile(r"^(?:ckpt|state)-e(\d{3,})-s(\d{6,})\.safetensors$")  # a snapshot's two tensor files
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def names(epoch: int, step: int) -> tuple[str, str, str]:
    """(weights, trainer tensors, marker) file names of the snapshot at STEP of EPOCH."""
    tag = f"e{epoch:03d}-s{step:06d}"
    return f"ckpt-{tag}.safetensors", f"state-{tag}.safetensors", f"state-{tag}.json"


def _steps(run: Path, epoch: int | None = None) -> list[tuple[int, int]]:
    found = []
    for p in run.glob("state-e*-s*.json"):
        m = SNAPSHOT_RE.match(p.name)
        if m and (epoch is None or int(m.group(1)) == epoch):
            found.append((int(m.group(1)), int(m.group(2))))
    return sorted(found)


def latest(run: Path, epoch: int) -> int | None:
    """The step of EPOCH's newest complete snapshot in RUN (all three files there), or None."""
    for e, s in reversed(_steps(run, epoch)):
        if all((run / n).is_file() for n in names(e, s)):
            return s
    return None


def remove(run: Path, keep: tuple[int, int] | None = None) -> None:
    """Remove every snapshot in RUN but KEEP (epoch, step): the marker first, so a kill halfway
    never leaves a marker without its tensors."""
    for e, s in _steps(run):
        if (e, s) != keep:
            ckpt, tensors, marker = names(e, s)
            for n in (marker, tensors, ckpt):
                (run / n).unlink(missing_ok=True)
    for p in [*run.glob("ckpt-e*-s*.safetensors"), *run.glob("state-e*-s*.safetensors")]:
        m = SNAPSHOT_TENSORS_RE.match(p.name)
        if m and (int(m.group(1)), int(m.group(2))) != keep and not (run / names(*map(int, m.groups()))[2]).exists():
            p.unlink(missing_ok=True)  # left by a kill between a snapshot's files


def random_state(gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's random streams at this moment: torch's (dropout), CUDA's, the augmentations'."""
    import torch

    state = {"torch": torch.get_rng_state(), "augment": gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_random_state(state: dict[str, torch.Tensor], gen: torch.Generator, device: torch.device) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    gen.set_state(state["augment"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save(run: Path, epoch: int, step: int, *, weights: dict, data: dict, meta: dict,
         velocity: dict[str, torch.Tensor], ranks: list[dict], state: dict) -> Path:
    """Write the snapshot at STEP of EPOCH (RANKS: each rank's {"random": random_state(...),
    "tally": [steps, loss sum, misses, images]}); returns the weights' path."""
    ckpt_name, tensors_name, marker = names(epoch, step)
    ck.save_checkpoint(run / ckpt_name, weights, data, dict(meta, epoch=epoch, step=step, mid_epoch=True))
    tensors = {f"velocity.{k}": v for k, v in velocity.items()}
    for r, rank in enumerate(ranks):
        tensors.update({f"random.{r}.{k}": v for k, v in rank["random"].items()})
    write_safetensors(run / tensors_name, tensors, {"alexcli": '{"format": "alexcli-snapshot"}'})
    write_json(run / marker, ck.seal_state(dict(state, epoch=epoch, step=step,
                                                tallies=[rank["tally"] for rank in ranks])))
    remove(run, keep=(epoch, step))
    return run / ckpt_name


class Snapshot(NamedTuple):
    """A snapshot as one rank resumes from it."""

    ckpt: ck.Checkpoint
    velocity: dict[str, torch.Tensor]
    random: dict[str, torch.Tensor]  # this rank's random_state()
    tally: list                      # this rank's [steps, loss sum, misses, images]
    state: dict                      # the marker: schedule, best, metric rows, position, config


def _unreadable(run: Path, epoch: int, step: int, exc: Exception) -> DataError:
    return DataError(f"{run / names(epoch, step)[2]}: snapshot unreadable ({type(exc).__name__}: {exc}); "
                     "delete its three files to resume from the last epoch instead")


def read_state(run: Path, epoch: int, step: int) -> dict:
    """The snapshot's marker alone (the run's settings and position), without its tensors."""
    try:
        state = json.loads((run / names(epoch, step)[2]).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _unreadable(run, epoch, step, exc) from None
    return ck.check_state(state, run / names(epoch, step)[2])


def load(run: Path, epoch: int, step: int, rank: int) -> Snapshot:
    """The snapshot at STEP of EPOCH as RANK resumes from it."""
    from safetensors.torch import load_file

    ckpt = ck.load_checkpoint(run / names(epoch, step)[0])
    state = read_state(run, epoch, step)
    try:
        tensors = load_file(str(run / names(epoch, step)[1]))
        tally = state["tallies"][rank]
    except Exception as exc:
        raise _unreadable(run, epoch, step, exc) from None
    velocity = {k[9:]: v for k, v in tensors.items() if k.startswith("velocity.")}
    prefix = f"random.{rank}."
    random = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return Snapshot(ckpt, velocity, random, tally, state)


class StopSignals:
    """While active, SIGTERM and SIGINT do not kill the run: they ask it to stop at the next step,
    after saving where it is (`signum` says which arrived). A second SIGINT stops at once, as Ctrl-C
    twice does elsewhere. Only the main thread can set handlers; elsewhere this does nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}
