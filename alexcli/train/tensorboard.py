"""`train --tensorboard DIR`: the run as TensorBoard event files (torch.utils.tensorboard's
SummaryWriter), written by rank 0 only.

What is logged, all against the global step (epoch - 1) * steps_per_epoch + step, so a resumed
run continues the same curves:

  train/loss, train/lr, train/images_per_s   at every loss check (LOG_EVERY steps): the mean loss
                                             of the steps since the last check, on rank 0
  epoch/<field>                              each epoch: every number of its metrics.jsonl row
                                             (train_loss, val_top1_error, lr, images_per_s, ...)
  best/val_top1_error                        each validated epoch: the best so far
  conv1/kernels                              each epoch: the first layer's kernels, as `alexcli
                                             kernels` draws them (alexcli.figures.kernels)
  config (text), HParams                     the TrainConfig and Arch fields; the HParams
                                             dashboard reads the epoch/ and best/ curves' last
                                             values as the run's metrics

DIR `auto` is RUN/tensorboard: the run's own, so a fresh start (and --overwrite) clears its event
files, and it moves with the run folder. Any other DIR is the user's: nothing in it is ever
removed. A resumed run's writer starts with TensorBoard's purge step, so events a killed run
wrote after its last saved position are hidden (by TensorBoard's Python loader and
EventAccumulator; `tensorboard --load_fast=false`).

A failure to write (a full disk) stops the run with one line, like every other write: the event
writer's thread keeps the error, the next call here re-raises it (every call flushes, so that is
the next loss check at the latest), and the thread's own traceback is kept off the screen.

The tensorboard package is optional (`pip install 'alexcli[tensorboard]'`); nothing here imports
it, or torch, until a run asks for it, so `TrainConfig.validate` can call `check`."""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from pathlib import Path

from alexcli.errors import AlexcliError, DiskFull, UsageError

AUTO = "auto"                 # --tensorboard auto: RUN/tensorboard
OWN_FOLDER = "tensorboard"    # its name in the run folder (launch.RUN_FILE_RE matches files only)
EVENT_FILES = "events.out.tfevents.*"
MISSING = "--tensorboard needs the tensorboard package: pip install 'alexcli[tensorboard]'"
# metrics-row fields that say where the row is, not how the run does: not curves
NOT_CURVES = ("epoch", "step", "resumed_at_step", "left_chance_step")
# what the HParams dashboard shows for each run (the last value of each curve)
METRICS = ("epoch/val_top1_error", "epoch/val_top5_error", "epoch/val_loss", "epoch/train_loss",
           "epoch/train_top1_error", "best/val_top1_error")


def log_dir(cfg) -> Path | None:
    """Where the run's event files go (None: --tensorboard not given)."""
    if not cfg.tensorboard:
        return None
    return Path(cfg.out) / OWN_FOLDER if cfg.tensorboard == AUTO else Path(cfg.tensorboard)


def require() -> None:
    """The tensorboard package, or the one line saying how to install it."""
    import importlib

    try:
        importlib.import_module("tensorboard")  # torch.utils.tensorboard needs it
    except ImportError:
        raise UsageError(MISSING) from None


def check(cfg) -> None:
    """--tensorboard's checks before the run folder is touched: the package, and a DIR that can be
    a folder."""
    folder = log_dir(cfg)
    if folder is None:
        return
    require()
    if cfg.tensorboard == AUTO:
        return  # inside the run folder, which train checks
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--tensorboard {folder}: exists and is not a folder")
    parent = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
        raise UsageError(f"--tensorboard {folder}: cannot write in {parent}")


def _event_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(EVENT_FILES)) if folder.is_dir() else []


_quiet_lock = threading.Lock()


def _quiet_writer_threads() -> None:
    """Keep the traceback of a tensorboard writer thread that failed off stderr (once per
    process; other threads' go to the hook there was). The thread keeps its exception, and the
    writer's next call in the main thread raises it, which `Board` turns into one line."""
    with _quiet_lock:
        if getattr(threading.excepthook, "_alexcli_tensorboard", False):
            return
        previous = threading.excepthook

        def hook(args):
            if type(args.thread).__module__.startswith("tensorboard.summary.writer"):
                return
            previous(args)

        hook._alexcli_tensorboard = True
        threading.excepthook = hook


def _flat(value):
    """A setting as an HParams value: numbers, strings and booleans as they are, lists joined."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return value if isinstance(value, (bool, int, float, str)) or value is None else str(value)


class Board:
    """The run's TensorBoard writer (rank 0). STEPS: steps per epoch; START, MID: where the run
    continues (epoch START done, MID steps into the next); HINT: the command that continues the
    run, named when a write fails."""

    def __init__(self, cfg, arch, *, steps: int, start: int, mid: int, hint: str, notes=None):
        require()
        from torch.utils.tensorboard import SummaryWriter

        self.dir, self.arch, self.hint = log_dir(cfg), arch, hint
        self.images_per_s_since = time.perf_counter()
        fresh = not (start or mid)
        if fresh and cfg.tensorboard == AUTO:  # the run's own folder starts again with the run
            for p in _event_files(self.dir):
                p.unlink(missing_ok=True)
        earlier = _event_files(self.dir)
        if fresh and earlier and notes is not None:
            notes(f"--tensorboard {self.dir} already holds TensorBoard events: this run's go beside them "
                  f"(give each run a folder of its own to tell them apart)")
        # resumed: hide what a killed run logged after the position it continues from; a fresh
        # start into a folder with events: hide all of theirs
        purge = start * steps + mid + 1 if not fresh else (0 if earlier else None)
        _quiet_writer_threads()
        self.writer = None
        self.last = start * steps + mid  # the newest global step logged
        with self._writing():
            self.writer = SummaryWriter(str(self.dir), purge_step=purge, flush_secs=30)
            if fresh or not earlier:
                self._hparams(cfg, arch, self.last)
            self.writer.add_text("config", self._config_text(cfg, arch, start, mid), self.last)
            self.writer.flush()

    # -- what the loop calls

    def begin_epoch(self) -> None:
        """An epoch (or the rest of one) starts: images/s counts from here."""
        self.images_per_s_since = time.perf_counter()

    def step(self, global_step: int, loss: float, lr: float, images: int) -> None:
        """A loss check: LOSS the mean over the steps since the last one, IMAGES trained in them
        (over all ranks)."""
        now = time.perf_counter()
        rate = images / max(now - self.images_per_s_since, 1e-9)
        self.images_per_s_since = now
        self.last = max(self.last, global_step)
        with self._writing():
            self.writer.add_scalar("train/loss", loss, global_step)
            self.writer.add_scalar("train/lr", lr, global_step)
            self.writer.add_scalar("train/images_per_s", rate, global_step)
            self.writer.flush()

    def epoch(self, metrics: dict, best: dict, state: dict) -> None:
        """An epoch's end: its metrics row, the best val error so far, conv1's kernels from the
        network's (one-device) STATE."""
        step = metrics["step"]
        self.last = max(self.last, step)
        with self._writing():
            for k, v in metrics.items():
                if k not in NOT_CURVES and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(f"epoch/{k}", v, step)
            if best.get("epoch") is not None and math.isfinite(best["val_top1_error"]):
                self.writer.add_scalar("best/val_top1_error", best["val_top1_error"], step)
            picture = kernels_picture(state, self.arch.groups)
            if picture is not None:
                self.writer.add_image("conv1/kernels", picture, step, dataformats="HWC")
            self.writer.flush()

    def finish(self) -> None:
        """The run trained all its epochs: mark its HParams session done, and close."""
        from torch.utils.tensorboard.summary import hparams

        with self._writing():
            self.writer.file_writer.add_summary(hparams({}, {})[2], self.last)
            self.writer.flush()
            self.writer.close()

    # -- inside

    def _hparams(self, cfg, arch, at: int) -> None:
        from torch.utils.tensorboard.summary import hparams

        exp, ssi, _ = hparams(self.settings(cfg, arch), dict.fromkeys(METRICS, 0.0))  # metrics: tags only
        self.writer.file_writer.add_summary(exp, at)
        self.writer.file_writer.add_summary(ssi, at)

    @staticmethod
    def settings(cfg, arch) -> dict:
        """The hyperparameters: every TrainConfig field, and the Arch's as arch.<field>."""
        d = {k: _flat(v) for k, v in cfg.to_dict().items()}
        d.update({f"arch.{k}": _flat(v) for k, v in arch.to_dict().items()})
        return d

    def _config_text(self, cfg, arch, start: int, mid: int) -> str:
        where = (f"resumed at epoch {start + 1} step {mid}" if mid else f"resumed after epoch {start}" if start
                 else "started")
        rows = "\n".join(f"| {k} | {'' if v is None else v} |" for k, v in self.settings(cfg, arch).items())
        return f"Run {where}.\n\n| setting | value |\n|---|---|\n{rows}\n"

    @contextlib.contextmanager
    def _writing(self):
        """Every call to the writer: a failure to write becomes one line, and the writer stops."""
        try:
            yield
        except Exception as exc:
            if not _write_failure(exc):
                raise
            self._abandon()
            raise self._failed(exc) from None

    def _abandon(self) -> None:
        """Stop the writer after a failure, quietly (its thread may be gone already)."""
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001  (the failure is reported already)
                pass

    def _failed(self, exc: BaseException) -> AlexcliError:
        from alexcli.io import free_space, is_disk_full, size_text

        then = f"continue with: {self.hint} (or give --tensorboard '' to go on without it)"
        if is_disk_full(exc):
            free = free_space(self.dir)
            return DiskFull(f"{self.dir}: no space left on device writing TensorBoard events "
                            f"({size_text(free) if free else 'nothing'} free); free some space and {then}")
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return AlexcliError(f"{self.dir}: cannot write TensorBoard events: {why}; {then}")


def _write_failure(exc: BaseException) -> bool:
    """An error of the event writer's file system (tensorboard's own errors are not OSErrors)."""
    if isinstance(exc, OSError):
        return True
    try:
        from tensorboard.compat.tensorflow_stub.errors import OpError
    except ImportError:
        return False
    return isinstance(exc, OpError)


def kernels_picture(state: dict, groups: int):
    """conv1's kernels from a (one-device) state dict as `alexcli kernels` draws them, without the
    title strip: an (H, W, 3) uint8 array, or None for a network without RGB kernels."""
    from alexcli.figures.kernels import first_layer_weight, kernel_grid

    weight = first_layer_weight(state)
    if weight is None:
        return None
    groups = groups if weight.shape[0] % groups == 0 else 1
    return kernel_grid(weight, groups)[0]
