"""The examples users copy: every `Example:` line of every command's --help and every `alexcli`
line in the README's code blocks, as argument lists (tests/test_examples.py parses each; the full
demo test runs those that use the demo's outputs)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def help_examples() -> list[tuple[str, list[str]]]:
    """(command, argv after `alexcli`) of each example in a command's help text."""
    import typer.main

    from alexcli.cli import app

    found = []
    for name, cmd in typer.main.get_command(app).commands.items():
        text = cmd.help or ""
        block = re.split(r"Examples?:", text, maxsplit=1)
        for line in (block[1].splitlines() if len(block) > 1 else []):
            line = line.strip()
            if line.startswith("alexcli "):
                found.append((name, shlex.split(line, comments=True)[1:]))
    return found


def readme_examples() -> list[list[str]]:
    """argv after `alexcli` of each `alexcli ...` or `$ alexcli ...` line in the README's code blocks."""
    text = (ROOT / "README.md").read_text()
    found = []
    for block in re.findall(r"```\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.removeprefix("$ ").strip()
            if line.startswith("alexcli ") and not line.split()[1].endswith(":"):  # not `alexcli 0.1.0: ...` output
                found.append(shlex.split(line, comments=True)[1:])
    return found


def readme_transcripts() -> list[tuple[list[str], list[str]]]:
    """(argv, the output lines the README shows) of each `$ alexcli ...` transcript."""
    text = (ROOT / "README.md").read_text()
    found = []
    for block in re.findall(r"```\n(.*?)```", text, flags=re.S):
        current = None
        for line in block.splitlines():
            if line.startswith("$ "):  # a prompt ends the transcript before it; an alexcli one starts the next
                current = (shlex.split(line[2:], comments=True)[1:], []) if line.startswith("$ alexcli ") else None
                if current is not None:
                    found.append(current)
            elif current is not None:
                current[1].append(line)
    return found


LONG = ("demo", "train", "experiment", "prepare")  # tested by their own tests, not rerun from examples


def runs_on_the_demo(argv: list[str]) -> bool:
    """Whether ARGV can run, in a few seconds, in a folder where `alexcli demo` ran: a command that
    is not a long job, every path it names one the demo wrote (runs/demo/..., shards/demo...)."""
    paths = [a for a in argv[1:] if not a.startswith("-") and ("/" in a or "." in a)]
    return argv[0] not in LONG and all(a == "runs/" or a.startswith(("runs/demo/", "shards/demo")) for a in paths)
