"""`python -m alexcli` and the `alexcli` command's entry point.

The command's modules (typer, rich, the commands) take a second or more to import; Ctrl-C in that
time is caught here, so it ends with one line like any other interruption, not a traceback."""

import sys


def run() -> None:
    try:
        from alexcli.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
    sys.exit(main())


if __name__ == "__main__":
    run()
