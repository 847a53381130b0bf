"""Every example a user copies from `--help` or the README names real options with valid values
(parsed by the command line itself, without running); tests/test_cli.py's full demo test runs the
ones that read the demo's outputs and compares the README's sample outputs with what they print."""

from __future__ import annotations

import pytest

from examples import help_examples, readme_examples


def parse(argv: list[str]) -> None:
    """Parse ARGV as `alexcli ARGV` would, up to (not into) running the command."""
    import typer.main

    from alexcli.cli import app

    group = typer.main.get_command(app)
    name, cmd, rest = group.resolve_command(group.make_context("alexcli", list(argv), resilient_parsing=True), argv)
    cmd.make_context(f"alexcli {name}", rest)  # raises on an unknown option or a bad value


def test_every_command_has_an_example():
    import typer.main

    from alexcli.cli import app

    have = {name for name, _ in help_examples()}
    assert set(typer.main.get_command(app).commands) <= have


@pytest.mark.parametrize("command,argv", help_examples(), ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_help_examples_parse(command, argv):
    parse(argv)


@pytest.mark.parametrize("argv", readme_examples(), ids=" ".join)
def test_readme_examples_parse(argv):
    parse(argv)


def test_a_stale_example_would_fail():
    """The parse above is a real check: an option that does not exist, or a value outside its
    choices, is refused."""
    import typer

    for argv in (["train", "--data", "shards/demo", "--bogus"], ["eval", "x.safetensors", "--crops", "nine"]):
        with pytest.raises((typer.TyperException, Exception)) as e:
            parse(argv)
        assert "bogus" in str(e.value) or "nine" in str(e.value)


def test_examples_run_on_the_demo_never_write_the_same_file_twice():
    """The full demo test runs every help and README example that reads the demo's outputs, in one
    folder: two of them writing the same --out of a command that refuses an existing one (the README
    repeated export's help example) made the second fail. (The pictures' PNGs are redrawn.)"""
    from examples import runs_on_the_demo

    seen: dict[str, list[str]] = {}
    for argv in [a for _, a in help_examples()] + readme_examples():
        if runs_on_the_demo(argv) and argv[0] in ("export", "import") and "--out" in argv:
            out = argv[argv.index("--out") + 1]
            assert out not in seen, f"{' '.join(argv)} and {' '.join(seen[out])} both write {out}"
            seen[out] = argv
