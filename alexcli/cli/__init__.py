"""The `alexcli` command: one module per command, wired here; errors translated once, in `main`."""

from __future__ import annotations

import os
import sys
import traceback

import typer

from alexcli import __version__
from alexcli.cli import demo, doctor, eval as eval_cmd, experiment, figures, plugins, prepare, train
from alexcli.errors import AlexcliError

app = typer.Typer(
    name="alexcli",
    help="Reproduce, study and extend AlexNet (Krizhevsky, Sutskever, Hinton 2012).\n\n"
         "Example: alexcli demo",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

_debug = False


def _version(value: bool) -> None:
    if value:
        typer.echo(f"alexcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error (or set ALEXCLI_DEBUG=1)."),
) -> None:
    global _debug
    _debug = debug


for module in (prepare, train, eval_cmd, experiment, figures, demo, plugins, doctor):
    module.register(app)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code. A typed error becomes one line on stderr."""
    global _debug
    _debug = os.environ.get("ALEXCLI_DEBUG", "") not in ("", "0")
    try:
        app(args=argv, prog_name="alexcli")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except AlexcliError as exc:
        if _debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def run() -> None:
    sys.exit(main())
