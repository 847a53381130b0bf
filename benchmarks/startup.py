"""Seconds from start to exit of short `alexcli` commands: the command as installed (the `alexcli`
script runs alexcli.__main__.run, which ends through exit_now, skipping the interpreter's
teardown) against the same command ending with Python's normal exit (`sys.exit(main())`), rounds
interleaved, medians and their ratio printed.

    .venv/bin/python benchmarks/startup.py                 # about a minute
    .venv/bin/python benchmarks/startup.py --rounds 5 --json

The commands: `--version` (typer and the command modules), `prepare --help` (rich too), `plugins`
(the entry points) and `doctor` (torch, torchvision, the devices). Every figure is a whole process,
Python's own start included."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from _data import machine

COMMANDS = {"--version": ["--version"], "prepare --help": ["prepare", "--help"], "plugins": ["plugins"],
            "doctor": ["doctor"]}
# both as the installed `alexcli` script starts them (python -m adds runpy's ~10 ms to either)
NORMAL_EXIT = "import sys; sys.argv[0] = 'alexcli'; from alexcli.cli import main; sys.exit(main())"
OURS = "import sys; sys.argv[0] = 'alexcli'; from alexcli.__main__ import run; run()"


def seconds(cmd: list[str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    took = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"error: {' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()[-300:]}")
    return took


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds (default 9)")
    ap.add_argument("--json", action="store_true", help="print the medians as JSON")
    args = ap.parse_args(argv)
    ways = {"normal exit": [sys.executable, "-c", NORMAL_EXIT], "alexcli": [sys.executable, "-c", OURS]}
    times = {(c, w): [] for c in COMMANDS for w in ways}
    for _ in range(args.rounds):
        for name, cmd_args in COMMANDS.items():
            for way, prefix in ways.items():
                times[name, way].append(seconds(prefix + cmd_args))
    rows = {name: {way: statistics.median(times[name, way]) for way in ways} for name in COMMANDS}
    import torch  # after the timing: this process's own imports are not in any figure

    where = machine(torch.device("cpu"))
    if args.json:
        print(json.dumps({"machine": where, "rounds": args.rounds, "median_seconds": rows}, indent=1))
        return
    print(", ".join(f"{k} {v}" for k, v in where.items() if v is not None))
    print(f"{'command':<16} {'normal exit':>12} {'alexcli':>10} {'ratio':>7}   (medians of {args.rounds} rounds)")
    for name, row in rows.items():
        print(f"{name:<16} {row['normal exit']:>10.3f} s {row['alexcli']:>8.3f} s {row['normal exit'] / row['alexcli']:>6.2f}x")


if __name__ == "__main__":
    main()
