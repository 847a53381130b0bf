"""Typed errors. The library raises these; the CLI edge turns each into one line and an exit code.

Nothing below the CLI prints or exits: `alexcli.cli.main` catches every exception once. An
`AlexcliError` becomes `error: <its message>` and its exit code; anything else (a bug, or the
machine failing under us) becomes `error: internal: <type>: <message>` and exit 1, with the
traceback only under `--debug`.
"""


class AlexcliError(Exception):
    """Base class: `str(err)` is the one line a user sees; `exit_code` is what the process returns."""

    exit_code = 1


class UsageError(AlexcliError):
    """Bad input from the user: a missing file, a wrong option value, an unusable folder."""

    exit_code = 2


class DataError(UsageError):
    """A data set or file that cannot be used as it is (no training split, a shard that disagrees
    with its manifest, a foreign output folder)."""


class PluginError(AlexcliError):
    """A plugin that is missing, fails to import, or whose name two packages claim."""

    exit_code = 2


class StrictRejectError(AlexcliError):
    """`prepare --strict` found files it had to reject."""

    exit_code = 1


class TrainingDiverged(AlexcliError):
    """The loss became NaN or infinite; the last good checkpoint is left in place."""

    exit_code = 1


class Interrupted(AlexcliError):
    """The user stopped a long job; what was finished is kept and a rerun continues from there."""

    exit_code = 130


class DiskFull(AlexcliError):
    """A write failed for lack of space (ENOSPC, EDQUOT): the file is not left half-written under
    its final name; the message names the path, what was being written and what is free."""

    exit_code = 1


class Stopped(AlexcliError):
    """A signal (SIGTERM from a cluster's scheduler, SIGINT from Ctrl-C) stopped a run after its
    position was saved; the message says what was saved and how to continue. Exit 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class Busy(UsageError):
    """Another alexcli process holds the folder (prepare's --out, train's run folder)."""
