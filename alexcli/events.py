"""The one progress protocol between the library and whoever shows it.

A long-running library function takes `progress: Progress` (a callable of one event) and calls it
with these typed events; it never prints. The command line renders them with one view
(`alexcli.cli._ui.Reporter`): a bar per `Begin`, moved by `Advance`, renamed by `Label`, and
`Note` lines printed above it. Tests and scripts can collect the events in a list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union


@dataclass(frozen=True)
class Begin:
    """A piece of work of known size starts (it replaces the bar of the previous one)."""

    label: str
    total: int
    unit: str = "images"     # what `total` and `Advance.n` count


@dataclass(frozen=True)
class Advance:
    """N more units of the current piece of work are done."""

    n: int = 1
    images: int | None = None  # images processed along with them (the rate shown), when units are not images
    loss: float | None = None  # training: the running mean loss of the epoch so far


@dataclass(frozen=True)
class Label:
    """The current piece of work has a new description (same bar, same count)."""

    text: str


@dataclass(frozen=True)
class Note:
    """A finished sentence for the user: a result line, a decision taken, something to know."""

    text: str


Event = Union[Begin, Advance, Label, Note]
Progress = Callable[[Event], None]


def ignore(event: Event) -> None:
    """A Progress that shows nothing (the default of every library function)."""
