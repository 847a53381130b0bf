"""Shared pieces of the command layer: consoles, JSON output, the progress bar."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Iterator, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from alexcli.env import device_name  # noqa: F401  (the commands' --device, re-exported)

# Data goes to stdout; progress and diagnostics to stderr.
err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=1) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def progress(description: str, unit: str = "images", quiet: bool = False) -> Iterator:
    """Yields a callback (event, n) for the library: ("total", n) then ("advance", n).
    The bar appears at the first "total", so an error found before the work starts prints
    only its one line."""
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TextColumn("eta"), TimeRemainingColumn(), TimeElapsedColumn(),
        console=err, disable=quiet, transient=False,
    )
    task = bar.add_task(description, total=None, rate="")

    started = False

    def update(event: str, n: int) -> None:
        nonlocal started
        if event == "total":
            if not started:
                bar.start()
                started = True
            bar.update(task, total=n)
        elif event == "advance":
            bar.advance(task, n)
            speed = bar.tasks[task].speed
            if speed:
                bar.update(task, rate=f"{speed:,.0f} {unit}/s")

    try:
        yield update
    finally:
        if started:
            bar.stop()


def data_folder(data: Optional[Path], ckpt: Path) -> Path:
    """--data, or the folder the checkpoint was trained on when it still exists."""
    from alexcli.errors import UsageError
    from alexcli.train.checkpoint import read_meta

    if data is not None:
        return data
    folder = read_meta(ckpt).get("data", {}).get("folder")
    if folder and Path(folder).is_dir():
        return Path(folder)
    raise UsageError(f"--data is needed: {ckpt} was trained on {folder or 'an unknown folder'}, which is not here")
