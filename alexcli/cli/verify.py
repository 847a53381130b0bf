"""`alexcli verify`: is a prepared data set, or a checkpoint, exactly what alexcli wrote?"""

from __future__ import annotations

from pathlib import Path

import typer

from alexcli import defaults
from alexcli.cli._ui import Reporter, emit_json, json_option, out


def _kind(where: str) -> str:
    from alexcli.data.dataset import MANIFEST
    from alexcli.data.remote import is_url
    from alexcli.errors import DataError

    if is_url(where):
        return "data"
    path = Path(where)
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return "data"
        raise DataError(f"{path}: neither a prepared data folder (no {MANIFEST}) nor a checkpoint file")
    if path.is_file():
        return "checkpoint"
    raise DataError(f"{path}: no such file or folder")


def _render(result: dict) -> None:
    for p in result["problems"]:
        out.print(p, soft_wrap=True, markup=False, highlight=False)
    n = len(result["problems"])
    verdict = "no problems" if not n else f"{n} problem{'s' if n != 1 else ''}"
    if result["kind"] == "data":
        splits = ", ".join(f"{k} {v['shards']} shards / {v['samples']:,} samples" for k, v in result["splits"].items())
        out.print(f"{result['path']}: {verdict}; {result['shards']} shards, {result['samples']:,} samples, "
                  f"{result['bytes'] / 1e6:,.1f} MB ({splits}) in {result['seconds']:.1f} s",
                  soft_wrap=True, markup=False, highlight=False)
    elif result["ok"]:
        out.print(f"{result['path']}: {verdict}; format version {result['format_version']}, {result['arch']}, "
                  f"{result['classes']} classes, epoch {result['epoch']}, {result['tensors']} tensors, "
                  f"{result['parameters']:,} parameters, sha256 {result['sha256'][:16]}...",
                  soft_wrap=True, markup=False, highlight=False)
    else:
        out.print(f"{result['path']}: {verdict}", soft_wrap=True, markup=False, highlight=False)


def verify_command(
    path: str = typer.Argument(..., help="A prepared data folder (with dataset.json), a URL of one (https://, "
                                         "s3:// or any fsspec URL, pipe:CMD with {}), or a checkpoint "
                                         "(.safetensors)."),
    workers: int = typer.Option(defaults.AUTO_WORKERS, min=-1, show_default=False, help="Processes reading and decoding shards (default -1: all cores "
                                                 "for a data set over 64 MB, at most one per shard; 0: in this "
                                                 "process)."),
    as_json: bool = json_option(),
) -> None:
    """Check that a data set or a checkpoint is exactly what alexcli wrote; list every problem.

    A data folder (or a URL of one: every shard is read once from there): every shard of every split exists with the size, sha256 and sample count
    dataset.json gives, and every sample's JPEG decodes to a size x size RGB image with a valid
    label; stats.safetensors has its tensors in their shapes; the class lists agree. Shards found
    good are remembered, so train and eval do not hash them again.

    A checkpoint: its metadata's sha256 and fields, its tensors' sha256, the layer variants it
    needs installed, its weights fitting its architecture.

    One line per problem, then a summary; exit 2 when there is any problem (the error line names
    the first one).

    Examples:
      alexcli verify shards/imagenet
      alexcli verify runs/alexnet/ckpt-e090.safetensors
      alexcli verify shards/cifar10 --json
      alexcli verify https://data.example.org/imagenet
    """
    import time

    from alexcli.errors import DataError

    kind = _kind(path)
    t0 = time.perf_counter()
    if kind == "data":
        from alexcli.data.dataset import check_data

        with Reporter() as report:
            result = check_data(path, workers=workers, progress=report)
    else:
        from alexcli.checkpoint import verify_checkpoint

        result = verify_checkpoint(Path(path))
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if as_json:
        emit_json(result)
    else:
        _render(result)
    problems = result["problems"]
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)


def register(app: typer.Typer) -> None:
    app.command("verify")(verify_command)
