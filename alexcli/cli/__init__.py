"""The `alexcli` command: one module per command, wired here; every error translated once, in `main`.

`main` is the edge: a bad option (Typer's own parsing), a typed library error, the machine failing
under us (an OSError such as a full disk) and a bug all end as one `error: ...` line on stderr and
an exit code; the traceback only with `--debug` or ALEXCLI_DEBUG=1.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings

import typer

from alexcli import __version__
from alexcli.cli import demo, doctor, eval as eval_cmd, experiment, figures, plugins, prepare, train, verify
from alexcli.errors import AlexcliError

# Typer 0.26+ carries its own copy of Click, whose errors derive from typer.TyperException; older
# Typer raises Click's own.
try:
    _ParseError = typer.TyperException
except AttributeError:  # pragma: no cover - Typer < 0.26
    import click

    _ParseError = click.ClickException

app = typer.Typer(
    name="alexcli",
    help="Reproduce, study and extend AlexNet (Krizhevsky, Sutskever, Hinton 2012).\n\n"
         "Example: alexcli demo",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

_debug = False  # set by main() from --debug or ALEXCLI_DEBUG
_python_show_warning = warnings.showwarning
INTERNAL_EXIT = 1


def _version(value: bool) -> None:
    if value:
        typer.echo(f"alexcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error (or set ALEXCLI_DEBUG=1)."),
) -> None:
    """(--debug is read by `main` from the arguments, so that it also covers errors Typer finds
    before this callback runs.)"""


for module in (prepare, train, eval_cmd, experiment, figures, verify, demo, plugins, doctor):
    module.register(app)


def _fail(message: str, code: int) -> int:
    if _debug:
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    return code


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """alexcli's own warnings (a plugin shadowing a built-in) as one `warning: ...` line; others as
    Python shows them."""
    from alexcli.plugins import PluginShadowWarning

    if issubclass(category, PluginShadowWarning):
        print(f"warning: {message}", file=file or sys.stderr)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code. Whatever goes wrong becomes one line on stderr."""
    global _debug
    _debug = os.environ.get("ALEXCLI_DEBUG", "") not in ("", "0") or "--debug" in (argv or sys.argv[1:])
    warnings.showwarning = _show_warning
    try:
        code = app(args=argv, prog_name="alexcli", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except AlexcliError as exc:
        return _fail(str(exc), exc.exit_code)
    except _ParseError as exc:  # a bad option or argument, found by Typer before the command runs
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            print(ctx.get_help())
            return 0
        where = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        return _fail(exc.format_message() + where, getattr(exc, "exit_code", 2))
    except typer.Abort:
        return _fail("aborted", 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except OSError as exc:  # the machine: a full disk, a file that vanished, a permission
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        return _fail(f"{where}{exc.strerror or exc}", 1)
    except Exception as exc:  # a bug: still one line, with the way to the traceback
        return _fail(f"internal: {type(exc).__name__}: {exc} (run with --debug for the traceback)", INTERNAL_EXIT)


def run() -> None:
    sys.exit(main())
