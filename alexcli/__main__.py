"""`python -m alexcli` and the `alexcli` command's entry point.

The command's modules (typer, rich, the commands) take a second or more to import; Ctrl-C in that
time is caught here, so it ends with one line like any other interruption, not a traceback."""

import atexit
import os
import sys
import threading


def run() -> None:
    try:
        from alexcli.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
    exit_now(main())


def exit_now(code: int) -> None:
    """End the process with CODE as sys.exit(CODE) would, without the interpreter's teardown.

    At exit Python frees every module and object one at a time: 50-60 ms after `alexcli prepare`
    (numpy, PIL, rich, alexcli's modules), in which nobody is served and, after a parallel
    prepare, every other core sits idle. What an exit does for others is done here first: threads
    that are not daemons are waited for, every atexit handler runs (a plugin's, multiprocessing's
    clean-up, coverage's), and stdout and stderr are flushed; then os._exit. alexcli closes and
    fsyncs what it writes where it writes it (alexcli.io), never leaving a file to the teardown.
    Not CPython (no atexit._run_exitfuncs): the normal exit."""
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if run_exitfuncs is None:  # pragma: no cover - CPython has it
        sys.exit(code)
    try:
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
        run_exitfuncs()
    except KeyboardInterrupt:  # Ctrl-C while waiting for them: stop waiting, as Python's exit does
        code = code or 130
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader has gone (`alexcli ... | head`): quietly, as rich's console does
        code = code or 1
    except (OSError, ValueError) as exc:  # a full disk under `> file`, a closed stdout
        sys.stderr.write(f"error: standard output: {getattr(exc, 'strerror', None) or exc}\n")
        code = code or 1
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(code)


if __name__ == "__main__":
    run()
