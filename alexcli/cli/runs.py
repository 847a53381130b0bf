"""`alexcli runs`: a table of the training runs and experiments in a folder."""

from __future__ import annotations

from pathlib import Path

import typer

from alexcli.cli._ui import emit_json, json_option, out


def status_text(row: dict) -> str:
    """The status as the table shows it: where an interrupted run stopped, who runs a running one,
    why a row is unreadable."""
    status = row["status"]
    if status == "interrupted" and row["stopped_at"]:
        status += f" at epoch {row['stopped_at']['epoch']} step {row['stopped_at']['step']}"
    elif status == "running" and row["lock"] and row["lock"].get("pid"):
        status += f" (pid {row['lock']['pid']})"
    if row["reason"] and status != "empty":
        status += f": {row['reason']}"
    return status


def _percent(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def render(root: Path, rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(title=f"runs under {root}", title_justify="left")
    for name, justify in (("run", "left"), ("epochs", "right"), ("best top-1", "right"), ("top-5", "right"),
                          ("at", "right"), ("last loss", "right"), ("init", "left"), ("network", "left"),
                          ("status", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    for r in rows:
        epochs = "-" if r["epochs_done"] is None else f"{r['epochs_done']}/{'?' if r['epochs'] is None else r['epochs']}"
        init = r["init"] or "-"
        if r["init_from"]:
            init += f" from {Path(r['init_from']).name}"
        table.add_row(r["path"], epochs, _percent(r["best_val_top1_error"]), _percent(r["best_val_top5_error"]),
                      "-" if r["best_epoch"] is None else f"e{r['best_epoch']}",
                      "-" if r["last_train_loss"] is None else f"{r['last_train_loss']:.3f}", init,
                      r["variants"] or r["arch"] or "-", status_text(r))
    out.print(table)


def runs_command(
    folder: Path = typer.Argument(Path("runs"), show_default=False, help="The folder to search, with its subfolders (default: runs)."),
    as_json: bool = json_option(),
) -> None:
    """List the training runs and experiments under a folder: epochs, best val error, network, status.

    A run is any folder holding metrics.jsonl or checkpoints (alexcli train --out); an experiment
    one holding results.json or fits/. Each row: epochs done of those configured, the best val
    top-1 error, the top-5 error and epoch of that best, the last training loss, the init preset
    and the network, and the status: finished, running (its folder is locked by a live alexcli
    process), interrupted (with the mid-epoch snapshot it would resume from), diverged (the loss
    became NaN, with where), empty, or unreadable with the reason. Only reads: no checkpoint's
    tensors are loaded and nothing is written.

    Example: alexcli runs runs/
    """
    from alexcli.runs import list_runs

    rows = list_runs(folder)  # a missing folder is a UsageError (exit 2): most likely a mistyped name
    if as_json:
        emit_json(rows)
        return
    if not rows:
        # An existing folder without runs is an answer, not an error (a fresh runs/, or one whose runs
        # were moved away): exit 0, as `ls` of an empty folder, and --json gives [].
        out.print(f"no training runs under {folder}", soft_wrap=True, markup=False, highlight=False)
        return
    render(folder, rows)


def register(app: typer.Typer) -> None:
    app.command("runs")(runs_command)
