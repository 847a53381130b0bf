"""alexcli: reproduce, study and extend AlexNet (Krizhevsky, Sutskever, Hinton 2012)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("alexcli")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
