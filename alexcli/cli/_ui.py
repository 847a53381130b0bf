"""Shared pieces of the command layer: consoles, JSON output, the one progress view, and the
options every command spells the same way."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from alexcli import defaults
from alexcli.choices import Amp, Crops, Device, Split
from alexcli.events import Advance, Begin, Event, Label, Note

# Output read by a program or kept in a log is never wrapped or cut: rich lays it out for 80 columns
# when the stream is not a terminal, which split paths across lines and cut table cells
# ("relu-seed0.safete…"). COLUMNS, when set, still rules.
PIPED_WIDTH = 10_000


def _console(stderr: bool):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    terminal = getattr(stream, "isatty", lambda: False)()
    wide = not terminal and not os.environ.get("COLUMNS")
    return Console(stderr=stderr, highlight=False, width=PIPED_WIDTH if wide else None)


class _LazyConsole:
    """A rich Console made on first use, standing in for it (attributes read and set go to it).
    Importing rich costs about 80 ms, which every command paid before parsing its options; now
    it is paid when something is first printed: in `prepare --workers 2`, after the worker process
    has started converting, so the two cores overlap it instead of one waiting for it."""

    def __init__(self, stderr: bool):
        object.__setattr__(self, "_stderr", stderr)
        object.__setattr__(self, "_made", None)

    def console(self):
        if self._made is None:
            object.__setattr__(self, "_made", _console(self._stderr))
        return self._made

    def __getattr__(self, name: str):
        return getattr(self.console(), name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.console(), name, value)


# Data goes to stdout; progress and diagnostics to stderr.
err = _LazyConsole(stderr=True)
out = _LazyConsole(stderr=False)


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=1) + "\n")
    sys.stdout.flush()


class Reporter:
    """Renders `alexcli.events` on stderr: a bar per `Begin` (count, rate, running loss, ETA),
    `Advance` moves it, `Label` renames it, `Note` prints a line above it. Use as a context
    manager; nothing is drawn before the first event, so an error found before the work starts
    prints only its one line. QUIET drops the bars and the notes (for --json runs of the demo)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.bar = None  # made with the first event: rich is imported then (see _LazyConsole)
        self.task = None
        self.started = False
        self._t0, self._done, self._unit = 0.0, 0, "images"

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            self.bar.stop()

    def _make_bar(self):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        return Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
            TextColumn("{task.fields[loss]}"), TextColumn("{task.fields[rate]}"), TextColumn("eta"),
            TimeRemainingColumn(), TimeElapsedColumn(), console=err.console(), disable=self.quiet, transient=False)

    def __call__(self, event: Event) -> None:
        if self.bar is None:
            self.bar = self._make_bar()
        if isinstance(event, Note):
            if not self.quiet:
                self.bar.console.print(event.text, soft_wrap=True, markup=False)
            return
        if not self.started:
            self.bar.start()
            self.started = True
        if isinstance(event, Begin):
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(event.label, total=event.total, unit=event.unit, loss="", rate="")
            self._t0, self._done, self._unit = time.perf_counter(), 0, event.unit
        elif self.task is None:
            return
        elif isinstance(event, Label):
            self.bar.update(self.task, description=event.text)
        elif isinstance(event, Advance):
            # the rate in images where the event says how many went by, else in the bar's own unit
            self._done += event.n if event.images is None else event.images
            unit = "img" if event.images is not None else self._unit
            elapsed = max(time.perf_counter() - self._t0, 1e-9)
            fields = {"rate": f"{self._done / elapsed:,.0f} {unit}/s"}
            if event.loss is not None:
                fields["loss"] = f"loss {event.loss:.3f}"
            self.bar.update(self.task, advance=event.n, **fields)


def data_folder(data: Optional[str], ckpt: Path) -> str:
    """--data as given (a folder or a URL, kept a string: Path() would collapse a URL's //), or the
    data set the checkpoint was trained on: its folder when it still exists, or the URL it recorded."""
    from alexcli.checkpoint import read_meta
    from alexcli.data.remote import is_url
    from alexcli.errors import UsageError

    if data is not None:
        return data
    meta = read_meta(ckpt)
    folder = meta.get("data", {}).get("folder")
    if folder and (is_url(folder) or Path(folder).is_dir()):
        return folder
    imported = meta.get("imported")
    if isinstance(imported, dict) and not folder:
        raise UsageError(f"--data is needed: {ckpt} was imported from {imported.get('kind')} weights and has no "
                         f"data set of its own (e.g. --data shards/imagenet)")
    raise UsageError(f"--data is needed: {ckpt} was trained on {folder or 'an unknown folder'}, which is not here")


# ---------------------------------------------------------------- options spelled the same everywhere

def json_option():
    return typer.Option(False, "--json", help="Print the result as JSON on stdout.")


def no_verify_option():
    """--no-verify of every command that reads shards."""
    return typer.Option(False, "--no-verify",
                        help="Do not check each shard's sha256 against dataset.json before first use (the "
                             "check is paid once per shard and remembered; for --data URL, every shard is "
                             "hashed as it streams). Sizes and sample counts are still checked.")


def device_option():
    return typer.Option(Device.auto, help="auto (CUDA when a GPU is visible), cpu or cuda.")


def amp_option():
    return typer.Option(Amp.none, help="none (fp32) or bf16 autocast.")


def crops_option():
    return typer.Option(Crops.center, help="center: the central patch; ten: the four corners, the centre and their "
                                           "reflections, softmax averaged (section 4.1).")


def workers_option():
    return typer.Option(defaults.AUTO_WORKERS, min=-1, show_default=False, help=f"Decoding processes ({WORKERS_RULE}).")


# The rule alexcli.data.stream.loader_workers applies to -1, said once for every command's --help.
WORKERS_RULE = ("default -1: on a GPU all cores but one per rank up to 8, on the CPU a quarter of them; at most "
                "one per shard")


def split_option(default: str, what: str):
    return typer.Option(Split(default), help=what)


def ckpt_argument():
    return typer.Argument(..., help="A checkpoint (ckpt-eNNN.safetensors) from alexcli train or alexcli experiment, "
                                    "or a run's folder: its best.safetensors, or with --last its latest epoch.")


def last_option():
    return typer.Option(False, "--last", help="Given a run folder, take its latest epoch's checkpoint instead of "
                                              "best.safetensors (the epoch with the lowest val top-1 error).")


def checkpoints(paths, last: bool) -> list[Path]:
    """The checkpoint files the command's PATHS name (a run folder: its best or, with LAST, its
    latest), each one taken from a folder said on stderr."""
    from alexcli.checkpoint import checkpoint_in

    found = [checkpoint_in(p, last) for p in paths]
    for given, used in zip(paths, found):
        if Path(given) != used:
            err.print(f"{given}: using {used}", soft_wrap=True)
    return found


DATA_HELP = ("a folder, or a URL of one: https://host/in1k, s3://bucket/in1k (any fsspec URL, with fsspec and "
             "its backend installed), or pipe:CMD with {} for each file's name, e.g. "
             "'pipe:aws s3 cp s3://bucket/in1k/{} -' (docs/cluster.md)")


def data_option(default_help: str = "the one it was trained on"):
    return typer.Option(None, "--data", help=f"Prepared data set: {DATA_HELP} (default: {default_help}).")
