"""The `alexcli` command: one module per command, wired here; every error translated once, in `main`.

`main` is the edge: a bad option (Typer's own parsing), a typed library error, the machine failing
under us (an OSError such as a full disk) and a bug all end as one `error: ...` line on stderr and
an exit code; the traceback only with `--debug` or ALEXCLI_DEBUG=1.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
import warnings

import typer

from alexcli import __version__
from alexcli.cli import (convert, demo, doctor, eval as eval_cmd, experiment, figures, plugins, prepare, runs, train,
                         verify)
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
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports a job stopped by Ctrl-C
_interrupted_at: list = []  # where Ctrl-C arrived (a stack summary), for --debug


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


for module in (prepare, train, eval_cmd, experiment, figures, convert, verify, demo, plugins, doctor, runs):
    module.register(app)


def _metavars(app: typer.Typer) -> None:
    """Name every parameter in `--help` as a reader expects. Typer shows a flag as `<bool>`, a
    repeatable option as `<list[str]>` and an argument as `{src}`; here a flag shows no value, a
    repeatable option its value once (`--layer TEXT`, the help says it repeats) and an argument its
    name in capitals (`SRC`, `CKPT`), as in the usage line. Set through the options' public
    `metavar`, once, for every command."""
    import inspect
    import typing

    from typer.models import ArgumentInfo, OptionInfo

    for command in app.registered_commands:
        hints = typing.get_type_hints(command.callback)
        for name, param in inspect.signature(command.callback).parameters.items():
            info, hint = param.default, hints.get(name)
            if getattr(info, "metavar", "") is not None:
                continue
            if isinstance(info, ArgumentInfo):
                info.metavar = name.upper()
            elif isinstance(info, OptionInfo) and hint is bool:
                info.metavar = ""
            elif isinstance(info, OptionInfo) and typing.get_origin(hint) in (list, typing.List):
                (item,) = typing.get_args(hint)
                info.metavar = {str: "TEXT", int: "INTEGER"}.get(item, getattr(item, "__name__", "VALUE").upper())


def _reflow(app: typer.Typer) -> None:
    """Join the lines of each prose paragraph of a command's help into one, so that the help wraps
    at the terminal's width: Typer keeps a docstring's line breaks, which on an 80-column terminal
    (or when piped) leaves every other line a stub. Paragraphs with an indented, list, table or
    `Example` line keep their lines."""
    import inspect

    def keep(paragraph: str) -> bool:
        return any(line[:1].isspace() or line.startswith(("- ", "* ", "|", "Example"))
                   for line in paragraph.splitlines())

    for command in app.registered_commands:
        text = inspect.cleandoc(command.help or command.callback.__doc__ or "")
        command.help = "\n\n".join(p if keep(p) else " ".join(p.split("\n")) for p in text.split("\n\n"))


_metavars(app)
_reflow(app)


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


def _on_ctrl_c(signum, frame) -> None:
    """SIGINT while a command runs: Python's KeyboardInterrupt, noting where it arrived. Typer turns
    an uncaught KeyboardInterrupt into a silent exit 130, so `main` says the line itself."""
    _interrupted_at[:] = [traceback.extract_stack(frame)]
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code. Whatever goes wrong becomes one line on stderr."""
    global _debug
    _debug = os.environ.get("ALEXCLI_DEBUG", "") not in ("", "0") or "--debug" in (argv or sys.argv[1:])
    warnings.showwarning = _show_warning
    _interrupted_at.clear()
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _on_ctrl_c) if on_main else None
    try:
        code = app(args=argv, prog_name="alexcli", standalone_mode=False)
        if code == INTERRUPTED_EXIT and _interrupted_at:  # a KeyboardInterrupt no command turned into a line
            if _debug:
                traceback.print_list(_interrupted_at[0])
            print("error: interrupted", file=sys.stderr)
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
        return _fail("interrupted", INTERRUPTED_EXIT)
    except OSError as exc:  # the machine: a full disk, a file that vanished, a permission
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        return _fail(f"{where}{exc.strerror or exc}", 1)
    except Exception as exc:  # a bug: still one line, with the way to the traceback
        return _fail(f"internal: {type(exc).__name__}: {exc} (run with --debug for the traceback)", INTERNAL_EXIT)
    finally:
        if on_main and previous is not None:
            signal.signal(signal.SIGINT, previous)
