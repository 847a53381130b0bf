"""alexcli: reproduce, study and extend AlexNet (Krizhevsky, Sutskever, Hinton 2012)."""

# The one home of the version: pyproject.toml reads it from here (setuptools' attr, which parses
# this file without importing it). A literal, not importlib.metadata.version("alexcli"): that
# imports importlib.metadata and the email package, 20-50 ms of every command's start.
__version__ = "0.1.0"
